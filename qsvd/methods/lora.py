"""LoRA (Hu et al. 2021): y = deq(Q(W)) x + s·B A x, with B = 0 and A Kaiming-uniform at init."""

import math

import torch
from torch import nn

from .base import AdapterLayer


class LoRALayer(AdapterLayer):
    name = "lora"
    trainable = ("lora_A", "lora_B")
    default_lr = 2e-4
    summary = "B A on the frozen 4-bit W; B = 0, A random (the QLoRA baseline)."
    random_init = True

    @classmethod
    def initial_tensors(cls, weight, spec, roundtrip):
        out_features, in_features = weight.shape
        lora_A = torch.empty(spec.rank, in_features, device=weight.device)
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))  # as nn.Linear and PEFT
        return {"lora_A": lora_A, "lora_B": torch.zeros(out_features, spec.rank, device=weight.device)}

    @classmethod
    def tensor_sizes(cls, out_features, in_features, rank):
        return {"lora_A": rank * in_features, "lora_B": out_features * rank}

    @classmethod
    def lora_update(cls, tensors, spec):
        """B' = s·B, A' = A."""
        return spec.scale * tensors["lora_B"], tensors["lora_A"]

    def adapter_delta(self):
        return self.scale * self.lora_B @ self.lora_A

    def forward(self, x):
        result = self.base(x)
        return result + self._low_rank(x, self.lora_B, self.lora_A).to(result.dtype)
