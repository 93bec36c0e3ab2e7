"""The prepared-model cache: split + quantize a model once, reuse it for every run of that setup.

<cache>/prepared/<key hash>/ holds
- frozen.safetensors: each target layer's frozen base as bitsandbytes stores it (the packed
  4-bit or int8 weight and its quantization statistics) and its bias;
- adapter.safetensors: the adapter's initial tensors;
- manifest.json: the key it was made for (source model fingerprint, method, rank, alpha, bits,
  targets, refinement and SVD iterations, compute dtype, and the seed where the split is
  random), the quantization report, and the sha256 of both files.
Embeddings, norms and head are not copied: they are read from the source model. A reload
runs no SVD and no quantization. The directory is written under a temporary name and renamed
into place, and a corrupt or mismatched one is never used: it is rebuilt.
"""

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import __version__, quantize
from .load import ModelFiles, atomic_dir, cache_dir, empty_model, open_weights
from .methods import METHODS, AdapterSpec
from .split import (QuantizationReport, adapter_layers, adapter_state, compute_dtype, default_device,
                    find_targets, load_non_targets, replace_layers, split_model)

FROZEN_FILE = "frozen.safetensors"
ADAPTER_FILE = "adapter.safetensors"
MANIFEST_FILE = "manifest.json"
console = Console(stderr=True)


def prepared_key(files: ModelFiles, spec: AdapterSpec, targets: list[str], device: torch.device,
                 seed: int) -> dict:
    """Everything the prepared tensors depend on (dropout, for one, they do not)."""
    return {"source": files.fingerprint(), "method": spec.method, "rank": spec.rank, "alpha": spec.alpha,
            "bits": spec.bits, "targets": targets, "refine_iters": spec.refine_iters,
            "svd_niter": spec.svd_niter, "core_init": spec.core_init, "dtype": str(compute_dtype(device)),
            "seed": seed if METHODS[spec.method].random_init else None}


def prepared_dir(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "prepared" / f"{key['method']}-r{key['rank']}-{key['bits']}bit-{digest}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_prepared(model: nn.Module, key: dict, report: QuantizationReport | None) -> Path:
    """Save a freshly split model's frozen layers and initial adapter tensors, atomically."""
    frozen = {f"{name}.{k}": t.contiguous() for name, layer in adapter_layers(model).items()
              for k, t in layer.base.state_dict().items()}

    def write(tmp: Path) -> None:
        save_file(frozen, tmp / FROZEN_FILE)
        save_file(adapter_state(model), tmp / ADAPTER_FILE)
        manifest = {"qsvd_version": __version__, "key": key,
                    "quantization_report": asdict(report) | {"ratio": report.ratio} if report else None,
                    "sha256": {name: _sha256(tmp / name) for name in (FROZEN_FILE, ADAPTER_FILE)}}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")

    return atomic_dir(prepared_dir(key), write)


def check_prepared(path: Path, key: dict) -> str | None:
    """Why the prepared model at `path` cannot be used for `key`, or None if it can."""
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return "missing or has no readable manifest"
    if manifest.get("key") != key:
        return "made for another model or setup"
    for name, digest in manifest.get("sha256", {}).items():
        if not (path / name).is_file() or _sha256(path / name) != digest:
            return f"corrupt ({name} does not match its checksum)"
    return None


def load_prepared(path: Path, model: nn.Module, files: ModelFiles, spec: AdapterSpec, targets: list[str],
                  device: torch.device, progress: bool = True) -> nn.Module:
    """Fill the empty `model` from the prepared model at `path` and the source's other tensors."""
    layer_cls = METHODS[spec.method]
    linears = find_targets(model, targets)
    load_non_targets(model, linears, open_weights(files, model), device)
    with safe_open(path / FROZEN_FILE, framework="pt", device=str(device)) as frozen, \
            safe_open(path / ADAPTER_FILE, framework="pt", device=str(device)) as adapter:
        def tensors_of(f, name: str) -> dict[str, torch.Tensor]:
            return {key.removeprefix(name + "."): f.get_tensor(key) for key in f.keys()
                    if key.startswith(name + ".")}

        def load_layer(name: str, linear: nn.Linear) -> nn.Module:
            base = quantize.load_frozen(tensors_of(frozen, name), spec.bits, compute_dtype(device), device)
            return layer_cls(base, tensors_of(adapter, name), spec)

        return replace_layers(model, spec, linears, load_layer, device, progress, "load prepared")


@dataclass
class Lookup:
    """Where the prepared model for a setup lives, and whether it can be used."""

    model: nn.Module  # the empty model, on the meta device
    targets: list[str]
    key: dict
    path: Path
    problem: str | None  # why the prepared model at `path` cannot be used; None if it can


def lookup(files: ModelFiles, spec: AdapterSpec, targets: list[str] | None, seed: int, device: torch.device,
           trust_remote_code: bool = False) -> Lookup:
    model = empty_model(files, trust_remote_code)
    names = list(find_targets(model, targets))
    key = prepared_key(files, spec, names, device, seed)
    path = prepared_dir(key)
    return Lookup(model, names, key, path, check_prepared(path, key) if path.exists() else "missing")


def build(found: Lookup, files: ModelFiles, spec: AdapterSpec, device: torch.device,
          progress: bool = True) -> nn.Module:
    """Split by streaming the checkpoint into the empty model, and save it as a prepared model."""
    if found.path.exists():
        console.print(f"the prepared model {found.path} is {found.problem}: rebuilding it")
    model, report = split_model(found.model, spec, found.targets, device,
                                weights=open_weights(files, found.model), progress=progress)
    write_prepared(model, found.key, report)
    console.print(f"prepared model saved to {found.path}")
    return model


def obtain(files: ModelFiles, spec: AdapterSpec, targets: list[str] | None = None, seed: int = 42,
           device: torch.device | str | None = None, trust_remote_code: bool = False,
           progress: bool = True) -> tuple[nn.Module, Path]:
    """The split model: from a matching prepared model if there is one, else split by streaming
    the checkpoint and saved as a prepared model. Returns the model and the prepared directory.

    Call `transformers.set_seed(seed)` first: methods with a random init draw from the global generator.
    """
    device = torch.device(device) if device is not None else default_device()
    found = lookup(files, spec, targets, seed, device, trust_remote_code)
    if found.problem is None:
        console.print(f"reusing the prepared model {found.path}")
        return load_prepared(found.path, found.model, files, spec, found.targets, device, progress), found.path
    return build(found, files, spec, device, progress), found.path
