"""LoRA-XS: y = deq(Q(W)) x + s·B R A x with frozen SVD factors and a trainable r × r core.

B = U_r (orthonormal columns), A = Σ_r V_rᵀ, both frozen; R ~ N(0, σ²), σ = 1e-5, or zeros.
The base W is not modified.
"""

import torch

from .. import svd
from .base import AdapterLayer

CORE_INIT_STD = 1e-5


class LoRAXSLayer(AdapterLayer):
    name = "loraxs"
    trainable = ("core",)
    default_lr = 2e-3
    summary = "frozen top-r SVD factors U_r, Σ_r V_rᵀ with a trainable r × r core R between them."
    random_init = True
    uses_top_svd = True

    @classmethod
    def initial_tensors(cls, weight, spec, roundtrip):
        u, s, vh = svd.top_triplets(weight, spec.rank, spec.svd_niter)
        core = torch.zeros(spec.rank, spec.rank, device=weight.device)
        if spec.core_init == "normal":
            core.normal_(0.0, CORE_INIT_STD)
        return {"lora_B": u, "core": core, "lora_A": s[:, None] * vh}

    @classmethod
    def tensor_sizes(cls, out_features, in_features, rank):
        return {"lora_A": rank * in_features, "lora_B": out_features * rank, "core": rank * rank}

    @classmethod
    def lora_update(cls, tensors, spec):
        """The base is untouched, so ΔW = s·B R A: B' = s·B R, A' = A."""
        return spec.scale * tensors["lora_B"] @ tensors["core"], tensors["lora_A"]

    def adapter_delta(self):
        return self.scale * self.lora_B @ self.core @ self.lora_A

    def forward(self, x):
        result = self.base(x)
        return result + self._low_rank(x, self.lora_B, self.core, self.lora_A).to(result.dtype)
