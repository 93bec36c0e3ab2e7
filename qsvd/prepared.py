"""The prepared-model cache: split + quantize a model once, reuse it for every run of that setup.

<cache>/prepared/<method>-r<rank>-<bits>bit-<key hash>/ holds
- layers-NNNNN.safetensors: shards of about 64 MiB with each target layer's state: its frozen
  base as bitsandbytes stores it (the packed 4-bit or int8 weight, its quantization
  statistics, the bias) under `<layer>.base.*`, and the adapter's initial tensors;
- manifest.json (`files.write_manifest`): the key it was made for (source model fingerprint, method, rank, alpha, bits,
  targets, refinement and SVD iterations, core init, compute dtype, and the seed where the
  split is random), the quantization report, and the sha256 of every shard.
Embeddings, norms and head are not copied: they are read from the source model. A reload runs
no SVD and no quantization. The directory is written under a temporary name and renamed into
place; a corrupt or mismatched one is never used, but rebuilt. A reuse reads each shard once,
checking its sha256 before it is used.

`qsvd init` streams both ways: each layer is read (the next one in a thread while this one is
split), split, quantized and written out in turn, so it never holds more than two shards of the
quantized model: one filling, one being written and hashed in a thread.
"""

import hashlib
import json
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from rich.progress import track
from safetensors.torch import load, save_file
from torch import nn

from .console import console
from .devices import compute_dtype, resolve_device
from .files import (cache_dir, file_sha256, one_writer, prefetch, publish, read_ahead, read_manifest,
                    seal_problem, write_manifest)
from .load import ModelFiles, empty_model
from .memory import return_freed_memory
from .methods import METHODS, AdapterLayer, AdapterSpec
from .split import (QuantizationReport, adapter_layers, check_rank, find_targets, layer_splitter, load_non_targets,
                    replace_layers, split_model, stored_layer, target_tensors)
from .version import __version__
from .weights import check_complete, open_weights

SHARD_BYTES = 64 * 2**20  # a reuse holds two at a time besides the model: the one in use, the next read
TRIM_EVERY_BYTES = 256 * 2**20  # `qsvd init` hands freed heap back after this many bytes of fp32 weights are split


def prepared_key(files: ModelFiles, spec: AdapterSpec, targets: list[str], device: torch.device,
                 seed: int) -> dict:
    """Everything the prepared tensors depend on (dropout, for one, they do not)."""
    return {"source": files.fingerprint, "method": spec.method, "rank": spec.rank, "alpha": spec.alpha,
            "bits": spec.bits, "targets": targets, "refine_iters": spec.refine_iters,
            "svd_niter": spec.svd_niter, "core_init": spec.core_init, "dtype": str(compute_dtype(device, spec)),
            "seed": seed if METHODS[spec.method].random_init else None}


def prepared_dir(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "prepared" / f"{key['method']}-r{key['rank']}-{key['bits']}bit-{digest}"


def write_prepared(path: Path, key: dict, layers: Iterable[tuple[str, AdapterLayer]],
                   report: QuantizationReport | None) -> Path:
    """Write `layers`, taken one at a time, into shards, then the manifest; all or nothing. Each
    shard is written and hashed in a thread while the next layers are made.

    `report` is read once every layer is written, so a lazy `layers` may still be filling it.
    """
    def save(tensors: dict[str, torch.Tensor], file: Path) -> str:
        save_file(tensors, file)
        tensors.clear()
        return_freed_memory()
        return file_sha256(file)  # from the page cache

    def write(tmp: Path) -> None:
        digests, pending = {}, {}
        with ThreadPoolExecutor(max_workers=1) as writer:
            def flush() -> None:
                nonlocal pending
                shard = f"layers-{len(digests) + 1:05d}.safetensors"
                digests[shard] = writer.submit(save, pending, tmp / shard)
                pending = {}

            for name, layer in layers:
                pending.update({f"{name}.{k}": t.contiguous() for k, t in layer.state_dict().items()})
                if sum(t.numel() * t.element_size() for t in pending.values()) >= SHARD_BYTES:
                    flush()
            if pending:
                flush()
            sha256 = {shard: digest.result() for shard, digest in digests.items()}
        write_manifest(tmp, qsvd_version=__version__, key=key, sha256=sha256,
                       quantization_report=asdict(report) | {"ratio": report.ratio} if report else None)

    return publish(path, write)


class CorruptPrepared(Exception):
    """A shard of a prepared model does not match the checksum in its manifest."""


def check_prepared(path: Path, key: dict, checksums: bool = False) -> str | None:
    """Why the prepared model at `path` cannot be used for `key`, or None if it can. The shards'
    checksums are checked only with `checksums`: `load_prepared` checks them as it reads."""
    manifest = read_manifest(path)
    if manifest is None:
        return "missing or has no readable manifest"
    if manifest.get("key") != key:
        return "made for another model or setup"
    return seal_problem(path, manifest["sha256"], checksums)


def read_shards(path: Path) -> Iterator[dict[str, torch.Tensor]]:
    """The tensors of each shard the manifest lists, in order, each shard read from the disk once:
    its bytes are checked against the manifest's sha256 before any tensor of it is used (else
    `CorruptPrepared`), and the next shard is read while the caller works on this one. The disk
    starts on all of them at this call."""
    digests = read_manifest(path)["sha256"]
    prefetch(path / shard for shard in digests)  # the disk reads them all while the caller works

    def read(shard: str) -> bytes:  # in a thread: reading and hashing let go of the GIL, parsing would not
        data = (path / shard).read_bytes()
        if hashlib.sha256(data).hexdigest() != digests[shard]:
            raise CorruptPrepared(f"corrupt ({shard} does not match its checksum)")
        return data

    return (load(data) for _, data in read_ahead(digests, read))


def load_prepared(path: Path, model: nn.Module, files: ModelFiles, spec: AdapterSpec, targets: list[str],
                  device: torch.device, progress: bool = True) -> nn.Module:
    """Fill the empty `model` from the prepared model at `path` and the source's other tensors.
    Raises `CorruptPrepared` if a shard does not match its checksum."""
    linears = find_targets(model, targets)
    shards, pending = read_shards(path), {}  # the disk starts on them while the source's tensors load
    dtype = compute_dtype(device, spec)
    load_non_targets(model, linears, open_weights(files, model), device, dtype)

    def load_layer(name: str, linear: nn.Linear) -> nn.Module:
        nonlocal pending
        prefix = name + "."
        while not any(key.startswith(prefix) for key in pending):  # layers are stored in this order
            pending = next(shards, None)
            if pending is None:
                raise CorruptPrepared(f"corrupt (no shard holds {name})")
        state = {key.removeprefix(prefix): pending.pop(key) for key in list(pending) if key.startswith(prefix)}
        return stored_layer(spec, device, dtype, state)

    return replace_layers(model, spec, linears, load_layer, device, dtype, progress, "load prepared")


@dataclass
class PreparedLookup:
    """Where the prepared model for a setup lives, and whether it can be used."""

    model: nn.Module  # the empty model, on the meta device
    targets: list[str]
    key: dict
    path: Path
    problem: str | None  # why the prepared model at `path` cannot be used; None if it can


def find_prepared(files: ModelFiles, spec: AdapterSpec, targets: list[str] | None, seed: int, device: torch.device,
                  trust_remote_code: bool = False, checksums: bool = False) -> PreparedLookup:
    """The prepared model for this setup; `checksums`: hash its shards now (else `load_prepared` does)."""
    model = empty_model(files, trust_remote_code)
    names = list(find_targets(model, targets))
    key = prepared_key(files, spec, names, device, seed)
    path = prepared_dir(key)
    return PreparedLookup(model, names, key, path, check_prepared(path, key, checksums) if path.exists() else "missing")


def split_and_save(found: PreparedLookup, files: ModelFiles, spec: AdapterSpec, device: torch.device,
          progress: bool = True) -> nn.Module:
    """Split by streaming the checkpoint into the empty model, and save it as a prepared model."""
    _say_rebuilding(found)
    model, report = split_model(found.model, spec, found.targets, device,
                                weights=open_weights(files, found.model), progress=progress)
    write_prepared(found.path, found.key, adapter_layers(model).items(), report)
    console.print(f"prepared model saved to {found.path}")
    return model


def split_to_disk(found: PreparedLookup, files: ModelFiles, spec: AdapterSpec, device: torch.device,
                  progress: bool = True) -> QuantizationReport | None:
    """`qsvd init`: read, split, quantize and write out one layer at a time, never holding the
    model; embeddings, norms and head are not even read, only looked for (tied ones once)."""
    _say_rebuilding(found)
    linears = find_targets(found.model, found.targets)
    check_rank(linears, spec.rank)
    weights = open_weights(files, found.model)
    found.model.tie_weights()
    stored = set(dict(found.model.named_parameters())) | set(dict(found.model.named_buffers()))
    check_complete(found.model, lambda name, _: name in weights or name not in stored)
    split_layer, report = layer_splitter(spec, device)

    def read(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = target_tensors(name, linears[name], weights)
        return weight.to(device).float(), bias

    def layers() -> Iterator[tuple[str, AdapterLayer]]:
        split_bytes = 0  # fp32 weights split since the freed heap was last handed back
        for name, (weight, bias) in track(read_ahead(linears, read), total=len(linears), description="split + quantize",
                                          disable=not progress, console=console):
            layer = split_layer(weight, bias)
            split_bytes += weight.numel() * 4
            del weight
            yield name, layer
            if split_bytes >= TRIM_EVERY_BYTES:
                return_freed_memory()
                split_bytes = 0

    write_prepared(found.path, found.key, layers(), report)
    if report is not None and progress:
        console.print(report.line())
    console.print(f"prepared model saved to {found.path}")
    return report


def _say_rebuilding(found: PreparedLookup) -> None:
    if found.path.exists():
        console.print(f"the prepared model {found.path} is {found.problem}: rebuilding it")


def load_or_split(files: ModelFiles, spec: AdapterSpec, targets: list[str] | None = None, seed: int = 42,
                  device: torch.device | str | None = None, trust_remote_code: bool = False,
                  progress: bool = True) -> tuple[nn.Module, Path]:
    """The split model: from a matching prepared model if there is one, else split by streaming
    the checkpoint and saved as a prepared model. Returns the model and the prepared directory.

    Call `transformers.set_seed(seed)` first: methods with a random init draw from the global generator.
    """
    device = resolve_device(device)
    found = find_prepared(files, spec, targets, seed, device, trust_remote_code)
    if found.problem is not None:
        with one_writer(found.path, wait=True, what="the prepared model"):
            found = find_prepared(files, spec, targets, seed, device, trust_remote_code)  # made meanwhile by another process?
            if found.problem is not None:
                return split_and_save(found, files, spec, device, progress), found.path
    console.print(f"reusing the prepared model {found.path}")
    try:
        return load_prepared(found.path, found.model, files, spec, found.targets, device, progress), found.path
    except CorruptPrepared as error:  # the half-filled model is dropped; a new empty one is split
        found = replace(found, model=empty_model(files, trust_remote_code), problem=str(error))
    with one_writer(found.path, wait=True, what="the prepared model"):
        return split_and_save(found, files, spec, device, progress), found.path
