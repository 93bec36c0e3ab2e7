"""What every method shares: a frozen (quantized) base linear plus adapter tensors.

A method is an `AdapterLayer` subclass that defines
- `initial_tensors(weight, spec)`: from the fp32 weight W, the adapter's initial tensors;
- `frozen_weight(weight, tensors, spec)`: what goes into frozen storage (W unless the
  method moves part of W into the adapter);
- `tensor_sizes(out, in, rank)`: the element count of each of its tensors, for `qsvd plan`;
- `lora_update(tensors, spec)`: the trained update as a plain LoRA on the original W, for export;
- `forward(x)`;
- for a method set from the data, `init_from_gradients(...)`, which `finetune` calls after the split.
Tensors named in `trainable` become parameters; the rest are frozen buffers.
"""

from dataclasses import dataclass
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import nn

from ..quantize import dequantize


CORE_INITS = ("normal", "zeros")
INIT_SAMPLES = {"math": 50, "commonsense": 170}  # rows a gradient init reads by default, by --task-type (LoRA-SB's code)


@dataclass(frozen=True)
class AdapterSpec:
    """Everything a layer's split needs besides its weight."""

    method: str
    rank: int
    alpha: float
    bits: int = 4
    dropout: float = 0.0
    core_init: str = "normal"  # one of CORE_INITS; loraxs/edora: R ~ N(0, 1e-5²), or "zeros"
    refine_iters: int = 0  # pissa: quantization-aware refinement iterations
    svd_niter: int | None = None  # top-r SVD: randomized with this many power iterations, or exact
    dtype: str = "auto"  # compute dtype of the frozen base and the activations: auto (by device), fp32, bf16, fp16

    @property
    def scale(self) -> float:
        """s = alpha / r."""
        return self.alpha / self.rank


class AdapterLayer(nn.Module):
    name: ClassVar[str]
    trainable: ClassVar[tuple[str, ...]]
    default_lr: ClassVar[float]
    summary: ClassVar[str]
    uses_alpha: ClassVar[bool] = True
    needs_gradient_init: ClassVar[bool] = False  # `init_from_gradients` sets its tensors after the split
    random_init: ClassVar[bool] = False  # the split draws from the random generator
    moves_weight: ClassVar[bool] = False  # the split changes the frozen base: W minus the adapter's initial product
    refines: ClassVar[bool] = False  # --refine-iters applies: the split absorbs the quantization error
    uses_top_svd: ClassVar[bool] = False  # the split takes a top-r SVD (so --svd-niter applies)

    def __init__(self, base: nn.Module, tensors: dict[str, torch.Tensor], spec: AdapterSpec):
        super().__init__()
        self.base = base
        self.spec = spec
        self.scale = spec.scale
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        device = base.weight.device
        # in one order whatever the source (a split or a prepared model's files): DDP matches
        # parameters and buffers across processes by their position
        for key, tensor in sorted(tensors.items()):
            tensor = tensor.detach().to(device, torch.float32, copy=True)  # never a view of a file
            if key in self.trainable:
                self.register_parameter(key, nn.Parameter(tensor))
            else:
                self.register_buffer(key, tensor)

    @classmethod
    def initial_tensors(cls, weight: torch.Tensor, spec: AdapterSpec,
                        roundtrip: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        """The adapter's initial tensors from the fp32 weight W (out × in).

        `roundtrip(M)` is deq(Q(M)) at the run's storage, for quantization-aware splits.
        """
        raise NotImplementedError

    @classmethod
    def frozen_weight(cls, weight: torch.Tensor, tensors: dict[str, torch.Tensor],
                      spec: AdapterSpec) -> torch.Tensor:
        """The matrix that is stored frozen: W itself unless the method says otherwise."""
        return weight

    @classmethod
    def tensor_sizes(cls, out_features: int, in_features: int, rank: int) -> dict[str, int]:
        """The element count of each of a layer's adapter tensors (all fp32), by name."""
        raise NotImplementedError

    @classmethod
    def init_from_gradients(cls, model: nn.Module, layers: dict[str, "AdapterLayer"], batches: Sequence[dict],
                            lr: float, budget_bytes: int | None = None, sketch: bool = False, loss=None) -> None:
        """Set the layers' tensors from the gradients of `loss(model, batch)` (default: the supervised
        loss) over `batches`, for a method that `needs_gradient_init`; `budget_bytes` bounds the
        gradients held at once, `sketch` holds a sketch of each instead."""
        raise NotImplementedError

    @classmethod
    def lora_update(cls, tensors: dict[str, torch.Tensor],
                    spec: AdapterSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """(B', A') with ΔW = B' A' the trained change of the *original* W, the scale folded into B'.

        A magnitude method (dora, edora) applies its m on top: (m / ‖W + B' A'‖_row) ⊙ (W + B' A').
        """
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def in_features(self) -> int:
        return self.base.in_features

    def base_weight(self) -> torch.Tensor:
        """deq(Q(W_base)) in float32 (costly: only for init and checks, never per step)."""
        return dequantize(self.base)

    def adapter_delta(self) -> torch.Tensor:
        """The dense out × in matrix the adapter adds to the base weight (before any magnitude)."""
        raise NotImplementedError

    def _low_rank(self, x: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
        """s · F_1 ⋯ F_k x, applied right to left, s taken on the first, r-wide product x F_kᵀ
        (not on the out-wide result): in the adapter's float32, or under autocast (training in bf16
        or fp16) in autocast's dtype, with no float32 copy of x to keep."""
        h = self.dropout(x if torch.is_autocast_enabled(x.device.type) else x.to(factors[-1].dtype))
        h = self.scale * (h @ factors[-1].T)
        for factor in reversed(factors[:-1]):
            h = h @ factor.T
        return h

    def extra_repr(self) -> str:
        return f"method={self.name}, rank={self.spec.rank}, scale={self.scale:g}, bits={self.spec.bits}"


def frozen_output(layer: AdapterLayer, x: torch.Tensor) -> torch.Tensor:
    """deq(Q(W)) x, without the bias."""
    out = layer.base(x)
    return out if layer.base.bias is None else out - layer.base.bias


def init_magnitude(layer: AdapterLayer) -> torch.Tensor:
    """m = ‖deq(Q(W))‖_row (trainable) and w = ‖deq(Q(W))‖²_row (a buffer); returns deq(Q(W)).

    The one dequantization of the frozen weight a magnitude method ever does.
    """
    weight = layer.base_weight()
    layer.register_buffer("weight_sq_norm", weight.square().sum(dim=1), persistent=False)
    layer.magnitude = nn.Parameter(layer.weight_sq_norm.sqrt())
    return weight


def magnitude_sizes(out_features: int) -> dict[str, int]:
    """The tensors `init_magnitude` adds: m and w, one number a row each."""
    return {"magnitude": out_features, "weight_sq_norm": out_features}


@torch.no_grad()
def norm_from_statistics(layer: AdapterLayer, weight_A: torch.Tensor, gram_A: torch.Tensor,
                         direction_B: torch.Tensor) -> torch.Tensor:
    """n = ‖deq(Q(W)) + s·B' A‖_row without the out × in weight, in O(out·r²):

        n² = w + 2s·rowsum(P ⊙ B') + s²·rowsum((B' G) ⊙ B'),

    with w = ‖deq(Q(W))‖²_row, P = deq(Q(W)) Aᵀ and G = A Aᵀ. B' is B for dora and B R for
    edora (rowsum((P Rᵀ) ⊙ B) = rowsum(P ⊙ (B R))).
    """
    s, B = layer.scale, direction_B.float()
    cross = (weight_A.float() * B).sum(dim=1)
    quad = ((B @ gram_A.float()) * B).sum(dim=1)
    return (layer.weight_sq_norm + 2 * s * cross + s * s * quad).clamp_min(0).sqrt()


def apply_magnitude(layer: AdapterLayer, base_out: torch.Tensor, x: torch.Tensor,
                    factors: Sequence[torch.Tensor], norm: torch.Tensor) -> torch.Tensor:
    """DoRA's output (m / n) ⊙ (deq(Q(W)) x + s·F_1 ⋯ F_k x) + b, with n detached, computed as

        c ⊙ deq(Q(W)) x + s·(c ⊙ F_1) F_2 ⋯ F_k x,   c = m / n,

    the row scale c riding on the out × r factor F_1, so that one fused multiply-add is the only
    op (besides the bias) over the out-wide activations, forward and backward.
    `base_out` is deq(Q(W)) x without the bias.
    """
    scale = layer.magnitude / norm
    delta_out = layer._low_rank(x, scale[:, None] * factors[0], *factors[1:])
    scaled = torch.addcmul(delta_out, base_out.to(delta_out.dtype), scale)
    if layer.base.bias is not None:
        scaled = scaled + layer.base.bias
    return scaled.to(base_out.dtype)
