"""PiSSA (arXiv 2404.02948): the top-r singular part of W trains, the residual stays frozen.

B = U_r·sqrt(Σ_r / s), A = sqrt(Σ_r / s)·V_rᵀ, frozen base Q(W − s·B A).
With `refine_iters` T > 0 (QPiSSA/LoftQ): B, A are re-taken T times from the top r of
E = W − deq(Q(W − s·B A)), so that B A also absorbs the quantization error.
With `svd_niter` the top-r triplets come from a randomized SVD; the frozen base is still
computed from the factors, so W = base + s·B A exactly (before quantization).
"""

import torch

from .. import svd
from .lora import LoRALayer


class PiSSALayer(LoRALayer):
    name = "pissa"
    trainable = ("lora_A", "lora_B")
    default_lr = 2e-4
    summary = "top-r singular components train; the residual W − s·B A is frozen (4-bit)."
    triplets = staticmethod(svd.top_triplets)
    random_init = False
    moves_weight = True
    refines = True
    uses_top_svd = True

    @classmethod
    def factors(cls, u, s, vh, spec) -> dict[str, torch.Tensor]:
        root = torch.sqrt(s / spec.scale)
        lora_B, lora_A = u * root, root[:, None] * vh
        # The frozen base is computed from the initial factors, kept for rebuilds and export.
        return {"lora_A": lora_A, "lora_B": lora_B,
                "lora_A_init": lora_A.clone(), "lora_B_init": lora_B.clone()}

    @classmethod
    def initial_tensors(cls, weight, spec, roundtrip):
        tensors = cls.factors(*cls.triplets(weight, spec.rank, spec.svd_niter), spec)
        for _ in range(spec.refine_iters):
            error = weight - roundtrip(cls.frozen_weight(weight, tensors, spec))
            tensors = cls.factors(*svd.top_triplets(error, spec.rank, spec.svd_niter), spec)
        return tensors

    @classmethod
    def tensor_sizes(cls, out_features, in_features, rank):
        sizes = super().tensor_sizes(out_features, in_features, rank)
        return sizes | {"lora_A_init": sizes["lora_A"], "lora_B_init": sizes["lora_B"]}

    @classmethod
    def lora_update(cls, tensors, spec):
        """ΔW = s·(B A − B₀ A₀), a rank-2r LoRA: B' = s·[B, −B₀], A' = [A; A₀]."""
        lora_B = torch.cat([tensors["lora_B"], -tensors["lora_B_init"]], dim=1)
        return spec.scale * lora_B, torch.cat([tensors["lora_A"], tensors["lora_A_init"]])

    @classmethod
    def frozen_weight(cls, weight, tensors, spec):
        return torch.addmm(weight, tensors["lora_B_init"], tensors["lora_A_init"], alpha=-spec.scale)
