"""Stage 2: replace each target linear layer by its method's split, one layer at a time.

For every target: W (read from the checkpoint, or taken from a loaded model, in fp32) → the
method's split → Q(frozen part), on the target device → adapter layer; W is dropped before
the next layer is touched. Streaming from the checkpoint, the peak is the final quantized
model plus a few fp32 copies of the largest layer.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from rich.progress import track
from torch import nn

from . import quantize
from .config import FinetuneConfig
from .console import console
from .devices import compute_dtype, resolve_device
from .errors import QSVDError
from .load import ModelFiles, empty_model
from .memory import return_freed_memory
from .methods import METHODS, AdapterLayer, AdapterSpec, check_bits, make_spec
from .weights import load_tensors, open_weights, read_checked


def find_targets(model: nn.Module, targets: Iterable[str] | None = None) -> dict[str, nn.Linear]:
    """The linear layers to adapt: by default every linear layer of the decoder blocks.

    `targets` are module-name suffixes such as "q_proj"; the output head is never a target.
    """
    head = model.get_output_embeddings()
    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and module is not head}
    if not linears:
        layers = sorted({type(module).__name__ for module in model.modules()
                         if next(module.parameters(recurse=False), None) is not None})
        raise QSVDError(f"{model.config.model_type} has no linear layers (torch.nn.Linear) for qsvd to adapt; "
                        f"its layers are {', '.join(layers)}")
    if targets is None:
        return linears
    targets = list(targets)
    chosen = {name: module for name, module in linears.items()
              if any(name == t or name.endswith("." + t) for t in targets)}
    if not chosen:
        existing = sorted({name.rsplit(".", 1)[-1] for name in linears})
        raise QSVDError(f"--targets {','.join(targets)} matches no linear layer; "
                        f"this model has: {','.join(existing)}")
    return chosen


def check_rank(linears: dict[str, nn.Linear], rank: int) -> None:
    for name, linear in linears.items():
        if rank > min(linear.out_features, linear.in_features):
            raise QSVDError(f"--rank {rank} is larger than min(out, in) = "
                            f"{min(linear.out_features, linear.in_features)} of layer {name} "
                            f"({linear.out_features} × {linear.in_features}); use a smaller --rank")


def replace_layers(model: nn.Module, spec: AdapterSpec | None, linears: dict[str, nn.Linear],
                   make_layer: Callable[[str, nn.Linear], nn.Module], device: torch.device, dtype: torch.dtype,
                   progress: bool, description: str = "split + quantize") -> nn.Module:
    """Swap each linear for `make_layer(name, linear)`, freeing the original as we go; then freeze
    everything but the adapters' trainable tensors and cast the rest to the compute `dtype`."""
    layers = {}
    for name in track(list(linears), description=description, disable=not progress, console=console):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layers[name] = make_layer(name, linears.pop(name))
        setattr(parent, child, layers[name])
        return_freed_memory()
    adapter_params = {id(p) for layer in layers.values() for p in layer.parameters()}
    for param in model.parameters():
        if id(param) not in adapter_params:
            param.requires_grad_(False)
            if param.is_floating_point():
                param.data = param.data.to(device, dtype)
    model.to(device)
    model.qsvd_spec = spec
    model.qsvd_targets = list(layers)
    return model


def frozen_layer(spec: AdapterSpec, device: torch.device, dtype: torch.dtype, frozen: torch.Tensor,
                 bias: torch.Tensor | None, tensors: dict[str, torch.Tensor]) -> AdapterLayer:
    """The adapter layer over Q(frozen), the method's frozen part of W: for a fresh split and a restore."""
    base = quantize.freeze(frozen, bias, spec.bits, dtype, device)
    return METHODS[spec.method](base, tensors, spec)


def stored_layer(spec: AdapterSpec, device: torch.device, dtype: torch.dtype,
                 state: dict[str, torch.Tensor]) -> AdapterLayer:
    """The adapter layer from its stored state (a prepared model's): the frozen base as bitsandbytes
    stores it, under `base.`, and the adapter's tensors."""
    base = {key.removeprefix("base."): t for key, t in state.items() if key.startswith("base.")}
    tensors = {key: t.to(device) for key, t in state.items() if not key.startswith("base.")}
    return METHODS[spec.method](quantize.load_frozen(base, spec.bits, dtype, device), tensors, spec)


def layer_state(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """Layer `name`'s tensors in a model-wide `state`, by their names in the layer (lora_A, core, …)."""
    prefix = name + "."
    return {key.removeprefix(prefix): t for key, t in state.items() if key.startswith(prefix)}


def trained_targets(model: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    """The layers a run adapted, found in `model` (its base model), in the run's order."""
    linears = find_targets(model)
    missing = [name for name in targets if name not in linears]
    if missing:
        raise QSVDError(f"the base model has no layer {missing[0]}: is it the model the run was trained on?")
    return {name: linears[name] for name in targets}


REPORT_SAMPLE = 2**16  # weights of a layer at most that the quantization report quantizes again


def sampled_error_sq(matrix: torch.Tensor, roundtrip) -> float:
    """‖M − deq(Q(M))‖², estimated from every k-th row of a matrix larger than `REPORT_SAMPLE`
    (whole rows are whole quantization blocks) and scaled by k; exact for a smaller one."""
    stride = max(1, matrix.numel() // REPORT_SAMPLE)
    rows = matrix[::stride].contiguous()
    return F.mse_loss(rows, roundtrip(rows), reduction="sum").item() * matrix.shape[0] / rows.shape[0]


@dataclass
class QuantizationReport:
    """For methods that move part of W into the adapter (pissa, milora) at 4 or 8 bits: the
    error ‖W − deq(base) − s·B A‖ of the split against plain QLoRA's ‖W − deq(Q(W))‖,
    as root sums of squares over all target layers.

    At init s·B A = s·B₀A₀, so the split's error is ‖R − deq(Q(R))‖ for the frozen R = W − s·B₀A₀.
    Both are measured on the same sampled rows (`sampled_error_sq`): from the tensors at hand,
    for 2% of a full quantization's cost. On TinyLlama-1.1B's shapes (benchmarks/init_memory.py's
    random weights) each layer's estimate came within 2% of the exact square, the model's within
    0.3%: the ratio's third digit may move."""

    error_sq: float = 0.0
    qlora_error_sq: float = 0.0

    def add(self, weight: torch.Tensor, frozen: torch.Tensor, roundtrip) -> None:
        self.error_sq += sampled_error_sq(frozen, roundtrip)
        self.qlora_error_sq += sampled_error_sq(weight, roundtrip)

    @property
    def ratio(self) -> float:
        return (self.error_sq / self.qlora_error_sq) ** 0.5

    def line(self) -> str:
        return (f"quantization error ‖W − deq(base) − s·B A‖ = {self.error_sq ** 0.5:.4g}, "
                f"{self.ratio:.3f} × plain QLoRA's ‖W − deq(Q(W))‖ = {self.qlora_error_sq ** 0.5:.4g}")


def layer_splitter(spec: AdapterSpec, device: torch.device):
    """`split_layer(W, b)` → the adapter layer over Q(frozen part of W), and the quantization
    report it fills in where one applies (else None)."""
    layer_cls, dtype = METHODS[spec.method], compute_dtype(device, spec)
    roundtrip = partial(quantize.roundtrip, bits=spec.bits, dtype=dtype)
    report = QuantizationReport() if layer_cls.moves_weight and spec.bits < 16 else None

    def split_layer(weight: torch.Tensor, bias: torch.Tensor | None) -> AdapterLayer:
        weight = weight.detach().to(device, torch.float32)
        # contiguous, as they will be when reloaded, so a restore recomputes the same frozen base
        tensors = {key: t.contiguous() for key, t in layer_cls.initial_tensors(weight, spec, roundtrip).items()}
        frozen = layer_cls.frozen_weight(weight, tensors, spec)
        layer = frozen_layer(spec, device, dtype, frozen, bias, tensors)
        if report is not None:
            report.add(weight, frozen, roundtrip)
        return layer

    return split_layer, report


def target_tensors(name: str, linear: nn.Linear, weights=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A target's W and b: read from the checkpoint if `weights` is given, else the loaded layer's."""
    if weights is None:
        return linear.weight, linear.bias
    read = {key: read_checked(weights, f"{name}.{key}", getattr(linear, key))
            for key in ("weight", "bias") if getattr(linear, key) is not None}
    return read["weight"], read.get("bias")


def load_non_targets(model: nn.Module, linears: dict[str, nn.Linear], weights, device: torch.device,
                     dtype: torch.dtype) -> None:
    """Read every tensor but the targets' weights and biases, in the compute `dtype`, onto `device`."""
    skip = {f"{name}.{key}" for name in linears for key in ("weight", "bias")}
    load_tensors(model, weights, skip=skip, device=device, dtype=dtype)


def split_model(model: nn.Module, spec: AdapterSpec, targets: Iterable[str] | None = None,
                device: torch.device | str | None = None, weights=None,
                progress: bool = True) -> tuple[nn.Module, QuantizationReport | None]:
    """Split every target layer of `model` by `spec`, in place, one layer at a time.

    With `weights` (from `load.open_weights`) `model` is an empty model from `load.empty_model`,
    and every tensor is read from the checkpoint when it is needed: the streaming split.
    Returns the model and, where it applies, the quantization report.
    """
    device = resolve_device(device)
    dtype = compute_dtype(device, spec)
    linears = find_targets(model, targets)
    check_rank(linears, spec.rank)
    split_layer, report = layer_splitter(spec, device)
    if weights is not None:
        load_non_targets(model, linears, weights, device, dtype)
    replace_layers(model, spec, linears, lambda name, linear: split_layer(*target_tensors(name, linear, weights)),
                   device, dtype, progress)
    if report is not None and progress:
        console.print(report.line())
    return model, report


def prepare(model: nn.Module, method: str, bits: int = FinetuneConfig.bits, rank: int = FinetuneConfig.rank,
            alpha: float | None = None, targets: Iterable[str] | None = None, dropout: float = FinetuneConfig.dropout,
            core_init: str = FinetuneConfig.core_init, refine_iters: int = FinetuneConfig.refine_iters,
            svd_niter: int | None = None, dtype: str = FinetuneConfig.dtype, grad_batches: Sequence[dict] | None = None,
            lr: float | None = None, grad_mem_budget: int | None = None, grad_sketch: bool = FinetuneConfig.grad_sketch,
            device: torch.device | str | None = None, progress: bool = True) -> nn.Module:
    """Turn a loaded HF causal LM into a trainable qsvd model, in place, with finetune's defaults.

    A method set from gradients (lorasb) also needs `grad_batches` (model inputs with labels) and
    `lr`, the η of its init step −η·sign(G) (`qsvd finetune` takes full fine-tuning's first step,
    see `train.init_step`); `grad_mem_budget` (bytes) and `grad_sketch` choose how its
    gradients are gathered.
    """
    spec = make_spec(method, rank, alpha, bits, dropout=dropout, core_init=core_init,
                     refine_iters=refine_iters, svd_niter=svd_niter, dtype=dtype)
    layer_cls = METHODS[method]
    if layer_cls.needs_gradient_init and (grad_batches is None or lr is None):
        raise QSVDError(f"{method} initialises from gradients: pass grad_batches=[batch, ...] and the "
                        "learning rate of its first step, lr=...")
    split_model(model, spec, targets, device, progress=progress)
    if layer_cls.needs_gradient_init:
        layer_cls.init_from_gradients(model, adapter_layers(model), grad_batches, lr, grad_mem_budget, grad_sketch)
    return model


def restore(model: nn.Module, spec: AdapterSpec, targets: list[str], tensors: dict[str, torch.Tensor],
            device: torch.device | str | None = None, weights=None, progress: bool = True) -> nn.Module:
    """Rebuild a qsvd model from saved adapter tensors, without any SVD.

    As in `split_model`, `weights` streams the base tensors into an empty `model`.
    """
    layer_cls = METHODS[spec.method]
    device = resolve_device(device)
    dtype = compute_dtype(device, spec)
    linears = trained_targets(model, targets)
    if weights is not None:
        load_non_targets(model, linears, weights, device, dtype)

    def rebuild_layer(name: str, linear: nn.Linear) -> AdapterLayer:
        weight, bias = target_tensors(name, linear, weights)
        own = {key: t.to(device) for key, t in layer_state(tensors, name).items()}
        frozen = layer_cls.frozen_weight(weight.detach().to(device, torch.float32), own, spec)
        layer = frozen_layer(spec, device, dtype, frozen, bias, own)
        layer.load_state_dict(own, strict=False)  # trained magnitude, where the method has one
        return layer

    return replace_layers(model, spec, linears, rebuild_layer, device, dtype, progress, "rebuild")


def quantized_model(files: ModelFiles, bits: int, device: torch.device | str | None = None,
                    trust_remote_code: bool = False, progress: bool = True) -> nn.Module:
    """The model without adapters, every linear layer of its decoder blocks stored as Q(W) at
    `bits` (the base of plain QLoRA at 4), read from the checkpoint one layer at a time."""
    check_bits(bits)
    device = resolve_device(device)
    dtype = compute_dtype(device)
    model = empty_model(files, trust_remote_code)
    weights = open_weights(files, model)
    linears = find_targets(model)
    load_non_targets(model, linears, weights, device, dtype)

    def freeze_layer(name: str, linear: nn.Linear) -> nn.Module:
        weight, bias = target_tensors(name, linear, weights)
        return quantize.freeze(weight.float(), bias, bits, dtype, device)

    return replace_layers(model, None, linears, freeze_layer, device, dtype, progress, f"load {bits}-bit")


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, AdapterLayer)}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor (trainable and frozen) by qualified name, without the frozen base."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            for key, tensor in module.state_dict().items():
                if not key.startswith("base."):
                    state[f"{name}.{key}"] = tensor.detach().contiguous()
    return state
