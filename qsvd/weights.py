"""Stage 1, the weights: a model's tensors read by name, one at a time, into an empty model.

From safetensors shards through `safe_open` (a tensor is a view of its shard's memory map), or
from a GGUF file, dequantized to float32 as it is read. So no step holds the whole 16-bit model.
"""

from collections.abc import Container
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import PreTrainedModel

from .errors import QSVDError, first_line
from .load import ModelFiles


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


def read_gguf(path: Path):
    """gguf's reader on `path` (its header and tensor table; the data stays on disk), or one line."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as error:  # a cut or corrupt file fails in numpy's memory map, struct, …
        raise QSVDError(f"{path} is not a readable GGUF file: {first_line(error)}; is it whole, as downloaded "
                        f"or exported?") from None


class GGUFWeights:
    """Tensors by HF name from a GGUF file, each dequantized to float32 as it is read."""

    def __init__(self, gguf: Path, model: PreTrainedModel):
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map)

        config = model.config.to_dict()
        self.processor = TENSOR_PROCESSORS.get(model.config.model_type, TensorProcessor)(config=config)
        hf_name = get_gguf_hf_weights_map(model, self.processor)
        self.tensors = {hf_name[t.name]: t for t in read_gguf(gguf).tensors if t.name in hf_name}
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

