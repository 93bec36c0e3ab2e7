"""Stage 2: replace each target linear layer by its method's split, one layer at a time.

For every target: W (upcast to fp32) → the method's split → Q(frozen part) → adapter layer;
the original 16-bit layer is dropped before the next one is touched.
"""

from collections.abc import Callable, Iterable, Sequence
from functools import partial

import torch
from rich.progress import track
from torch import nn

from . import quantize
from .errors import QSVDError
from .methods import METHODS, AdapterLayer, AdapterSpec
from .methods.lorasb import init_from_gradients


def compute_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU; bf16 on GPUs with native bf16 (compute capability ≥ 8.0), else fp16."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def find_targets(model: nn.Module, targets: Iterable[str] | None = None) -> dict[str, nn.Linear]:
    """The linear layers to adapt: by default every linear layer of the decoder blocks.

    `targets` are module-name suffixes such as "q_proj"; the output head is never a target.
    """
    head = model.get_output_embeddings()
    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and module is not head}
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


def _check_rank(linears: dict[str, nn.Linear], rank: int) -> None:
    for name, linear in linears.items():
        if rank > min(linear.out_features, linear.in_features):
            raise QSVDError(f"--rank {rank} is larger than min(out, in) = "
                            f"{min(linear.out_features, linear.in_features)} of layer {name} "
                            f"({linear.out_features} × {linear.in_features}); use a smaller --rank")


def _replace(model: nn.Module, linears: dict[str, nn.Linear],
             make_layer: Callable[[str, nn.Linear], AdapterLayer], progress: bool) -> dict[str, AdapterLayer]:
    """Swap each linear for `make_layer(name, linear)`, freeing the original as we go."""
    layers = {}
    for name in track(list(linears), description="split + quantize", disable=not progress):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layers[name] = make_layer(name, linears.pop(name))
        setattr(parent, child, layers[name])
    return layers


def _finish(model: nn.Module, layers: dict[str, AdapterLayer], spec: AdapterSpec,
            device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Freeze everything but the adapters' trainable tensors; cast the rest to the compute dtype."""
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


def _build_layer(layer_cls: type[AdapterLayer], weight: torch.Tensor, bias: torch.Tensor | None,
                 tensors: dict[str, torch.Tensor], spec: AdapterSpec, device: torch.device,
                 dtype: torch.dtype) -> AdapterLayer:
    """The adapter layer over Q(frozen part of W): shared by a fresh split and a restore."""
    frozen = quantize.freeze(layer_cls.frozen_weight(weight, tensors, spec), bias, spec.bits, dtype, device)
    return layer_cls(frozen, tensors, spec)


def make_spec(method: str, rank: int, alpha: float | None = None, bits: int = 4, **options) -> AdapterSpec:
    """The layer spec, with alpha defaulting to the rank (s = 1); lorasb always has s = 1."""
    if method not in METHODS:
        raise QSVDError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    if bits not in quantize.SUPPORTED_BITS:
        raise QSVDError(f"--bits {bits} is not supported; choose one of: 4, 8, 16")
    if rank <= 0:
        raise QSVDError(f"--rank must be a positive integer, got {rank}")
    if alpha is not None and alpha <= 0:
        raise QSVDError(f"--alpha must be positive, got {alpha}")
    if not METHODS[method].uses_alpha:
        if alpha is not None and alpha != rank:
            raise QSVDError(f"{method} fixes the scale s = 1 and takes no --alpha; drop the flag")
        alpha = None
    if not 0 <= options.get("dropout", 0.0) < 1:
        raise QSVDError(f"dropout must be in [0, 1), got {options['dropout']}")
    if options.get("core_init", "normal") not in ("normal", "zeros"):
        raise QSVDError(f"core_init must be 'normal' or 'zeros', got {options['core_init']!r}")
    refine_iters = options.get("refine_iters", 0)
    if refine_iters < 0 or (refine_iters and method != "pissa"):
        raise QSVDError("--refine-iters takes a count ≥ 0 and applies to pissa only")
    return AdapterSpec(method=method, rank=rank, alpha=float(alpha or rank), bits=bits, **options)


def prepare(model: nn.Module, method: str, bits: int = 4, rank: int = 16, alpha: float | None = None,
            targets: Iterable[str] | None = None, dropout: float = 0.0, core_init: str = "normal",
            refine_iters: int = 0, grad_batches: Sequence[dict] | None = None, lr: float | None = None,
            device: torch.device | str | None = None, progress: bool = True) -> nn.Module:
    """Turn a loaded HF causal LM into a trainable qsvd model, in place.

    lorasb also needs `grad_batches` (model inputs with labels) and the first step's `lr`.
    """
    spec = make_spec(method, rank, alpha, bits, dropout=dropout, core_init=core_init,
                     refine_iters=refine_iters)
    layer_cls = METHODS[method]
    if layer_cls.needs_gradient_init and grad_batches is None:
        raise QSVDError("lorasb initialises from gradients: pass grad_batches=[batch, ...]")
    device = torch.device(device) if device is not None else default_device()
    dtype = compute_dtype(device)
    linears = find_targets(model, targets)
    _check_rank(linears, rank)
    roundtrip = partial(quantize.roundtrip, bits=bits, dtype=dtype)

    def split_layer(name: str, linear: nn.Linear) -> AdapterLayer:
        weight = linear.weight.detach().to(device, torch.float32)
        # contiguous, as they will be when reloaded, so a restore recomputes the same frozen base
        tensors = {key: t.contiguous() for key, t in layer_cls.split(weight, spec, roundtrip).items()}
        return _build_layer(layer_cls, weight, linear.bias, tensors, spec, device, dtype)

    layers = _replace(model, linears, split_layer, progress)
    _finish(model, layers, spec, device, dtype)
    if layer_cls.needs_gradient_init:
        if lr is None:
            raise QSVDError("lorasb needs the learning rate of its first step: pass lr=...")
        init_from_gradients(model, layers, grad_batches, lr)
    return model


def restore(model: nn.Module, spec: AdapterSpec, targets: list[str], tensors: dict[str, torch.Tensor],
            device: torch.device | str | None = None, progress: bool = True) -> nn.Module:
    """Rebuild a qsvd model from saved adapter tensors, without any SVD."""
    layer_cls = METHODS[spec.method]
    device = torch.device(device) if device is not None else default_device()
    dtype = compute_dtype(device)
    linears = find_targets(model)
    missing = [name for name in targets if name not in linears]
    if missing:
        raise QSVDError(f"the base model has no layer {missing[0]}: is it the model this run was trained on?")
    linears = {name: linears[name] for name in targets}

    def rebuild_layer(name: str, linear: nn.Linear) -> AdapterLayer:
        weight = linear.weight.detach().to(device, torch.float32)
        own = {key.removeprefix(name + "."): t.to(device) for key, t in tensors.items()
               if key.startswith(name + ".")}
        layer = _build_layer(layer_cls, weight, linear.bias, own, spec, device, dtype)
        layer.load_state_dict(own, strict=False)  # trained magnitude, where the method has one
        return layer

    layers = _replace(model, linears, rebuild_layer, progress)
    return _finish(model, layers, spec, device, dtype)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor (trainable and frozen) by qualified name, without the frozen base."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            for key, tensor in module.state_dict().items():
                if not key.startswith("base."):
                    state[f"{name}.{key}"] = tensor.detach().contiguous()
    return state
