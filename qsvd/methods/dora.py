"""DoRA (Liu et al. 2024): y = (m / n) ⊙ (deq(Q(W)) x + s·B A x), n = ‖deq(Q(W)) + s·B A‖_row.

B, A start as in LoRA and m = ‖deq(Q(W))‖_row, so the output starts at the base output.
n is detached from the graph, as in the DoRA paper, and is computed without forming the
out × in weight: A's r rows ride along with the batch through the frozen 4-bit matmul, which
gives P = deq(Q(W)) Aᵀ for the cost of r more tokens, and then

    n² = w + 2s·rowsum(P ⊙ B) + s²·rowsum((B G) ⊙ B),   G = A Aᵀ, w = ‖deq(Q(W))‖²_row (from init).

At bits 8, P carries LLM.int8's row-wise input rounding, as the base output itself does.
"""

import torch

from .base import apply_magnitude, frozen_output, init_magnitude, magnitude_sizes, norm_from_statistics
from .lora import LoRALayer


class DoRALayer(LoRALayer):
    name = "dora"
    trainable = ("lora_A", "lora_B", "magnitude")
    default_lr = 2e-4
    summary = "LoRA's direction update plus a trainable per-row magnitude m."

    def __init__(self, base, tensors, spec):
        super().__init__(base, tensors, spec)
        init_magnitude(self)

    @classmethod
    def tensor_sizes(cls, out_features, in_features, rank):
        return super().tensor_sizes(out_features, in_features, rank) | magnitude_sizes(out_features)

    def weight_norm(self, weight_A: torch.Tensor | None = None) -> torch.Tensor:
        """n = ‖deq(Q(W)) + s·B A‖_row (detached), given P = deq(Q(W)) Aᵀ or computing it."""
        A = self.lora_A.detach()
        if weight_A is None:
            with torch.no_grad():
                weight_A = frozen_output(self, A).T
        return norm_from_statistics(self, weight_A, A @ A.T, self.lora_B.detach())

    def forward(self, x):
        rank = self.spec.rank
        rows = x.reshape(-1, self.in_features)
        stacked = frozen_output(self, torch.cat([rows, self.lora_A.detach().to(rows.dtype)]))
        base_out = stacked[:-rank].view(*x.shape[:-1], self.out_features)
        norm = self.weight_norm(stacked[-rank:].detach().T)
        return apply_magnitude(self, base_out, x, (self.lora_B, self.lora_A), norm)
