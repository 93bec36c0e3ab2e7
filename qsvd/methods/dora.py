"""DoRA (Liu et al. 2024): y = (m / n) ⊙ (deq(Q(W)) x + s·B A x), n = ‖deq(Q(W)) + s·B A‖_row.

B, A start as in LoRA and m = ‖deq(Q(W))‖_row, so the output starts at the base output.
n is detached from the graph, as in the DoRA paper.
"""

import torch
from torch import nn

from .base import apply_magnitude, row_norm
from .lora import LoRALayer


class DoRALayer(LoRALayer):
    name = "dora"
    trainable = ("lora_A", "lora_B", "magnitude")
    default_lr = 2e-4
    summary = "LoRA's direction update plus a trainable per-row magnitude m."

    def __init__(self, base, tensors, spec):
        super().__init__(base, tensors, spec)
        self.magnitude = nn.Parameter(row_norm(self.base_weight()))

    def forward(self, x):
        with torch.no_grad():
            norm = row_norm(self.base_weight() + self.adapter_delta())
        return apply_magnitude(self, x, self._low_rank(x, self.lora_B, self.lora_A), norm)
