"""EDoRA (arXiv 2501.12067): y = (m / n) ⊙ (deq(Q(W)) x + s·B R A x), n = ‖deq(Q(W)) + s·B R A‖_row.

B, A, R as in LoRA-XS; m = ‖deq(Q(W))‖_row is trainable, so at R = 0 the output is the base's.
n is detached and never needs the dequantized weight: with P = deq(Q(W)) Aᵀ, G = A Aᵀ and
w = ‖deq(Q(W))‖²_row, all taken once at init (A is frozen),

    n² = w + 2s·rowsum((P Rᵀ) ⊙ B) + s²·rowsum(((B R) G) ⊙ (B R)),

an O(out·r²) cost per step.
"""

import torch

from .base import apply_magnitude, frozen_output, init_magnitude, magnitude_sizes, norm_from_statistics
from .loraxs import LoRAXSLayer


class EDoRALayer(LoRAXSLayer):
    name = "edora"
    trainable = ("core", "magnitude")
    default_lr = 2e-3
    summary = "LoRA-XS's r × r core as the direction update, plus DoRA's per-row magnitude m."

    def __init__(self, base, tensors, spec):
        super().__init__(base, tensors, spec)
        weight = init_magnitude(self)
        self.register_buffer("weight_A", weight @ self.lora_A.T, persistent=False)  # P
        self.register_buffer("gram_A", self.lora_A @ self.lora_A.T, persistent=False)  # G

    @classmethod
    def tensor_sizes(cls, out_features, in_features, rank):
        return super().tensor_sizes(out_features, in_features, rank) | magnitude_sizes(out_features) | {
            "weight_A": out_features * rank, "gram_A": rank * rank}

    def weight_norm(self) -> torch.Tensor:
        """n = ‖deq(Q(W)) + s·B R A‖_row from the init-time statistics (detached)."""
        return norm_from_statistics(self, self.weight_A, self.gram_A, self.lora_B @ self.core.detach())

    def forward(self, x):
        return apply_magnitude(self, frozen_output(self, x), x, (self.lora_B, self.core, self.lora_A),
                               self.weight_norm())
