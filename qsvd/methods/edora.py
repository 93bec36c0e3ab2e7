"""EDoRA (arXiv 2501.12067): y = (m / n) ⊙ (deq(Q(W)) x + s·B R A x), n = ‖deq(Q(W)) + s·B R A‖_row.

B, A, R as in LoRA-XS; m = ‖deq(Q(W))‖_row is trainable, so at R = 0 the output is the base's.
n is detached and never needs the dequantized weight: with P = deq(Q(W)) Aᵀ, G = A Aᵀ and
w = ‖deq(Q(W))‖²_row, all taken once at init,

    n² = w + 2s·rowsum((P Rᵀ) ⊙ B) + s²·rowsum(((B R) G) ⊙ (B R)),

an O(out·r²) cost per step.
"""

import torch
from torch import nn

from .base import apply_magnitude, row_norm
from .loraxs import LoRAXSLayer


class EDoRALayer(LoRAXSLayer):
    name = "edora"
    trainable = ("core", "magnitude")
    default_lr = 2e-3
    summary = "LoRA-XS's r × r core as the direction update, plus DoRA's per-row magnitude m."

    def __init__(self, base, tensors, spec):
        super().__init__(base, tensors, spec)
        weight = self.base_weight()
        self.magnitude = nn.Parameter(row_norm(weight))
        self.register_buffer("weight_A", weight @ self.lora_A.T, persistent=False)  # P
        self.register_buffer("gram_A", self.lora_A @ self.lora_A.T, persistent=False)  # G
        self.register_buffer("weight_sq_norm", weight.square().sum(dim=1), persistent=False)  # w

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """n = ‖deq(Q(W)) + s·B R A‖_row from the init-time statistics (detached)."""
        s, B, R = self.scale, self.lora_B, self.core
        BR = B @ R
        cross = ((self.weight_A @ R.T) * B).sum(dim=1)
        quad = ((BR @ self.gram_A) * BR).sum(dim=1)
        return (self.weight_sq_norm + 2 * s * cross + s * s * quad).clamp_min(0).sqrt()

    def forward(self, x):
        delta_out = self._low_rank(x, self.lora_B, self.core, self.lora_A)
        return apply_magnitude(self, x, delta_out, self.weight_norm())
