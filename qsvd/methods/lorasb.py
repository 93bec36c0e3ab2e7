"""LoRA-SB (arXiv 2411.19557): a LoRA-XS core initialised from the first full fine-tuning step.

1. G = Σ over a few batches of ∂L/∂W, captured by hooks as Σ_tokens g xᵀ, so the frozen
   base may stay 4-bit.
2. ΔW = −η·sign(G), the first Adam step of full fine-tuning at learning rate η.
3. ΔW ≈ U_r S_r V_rᵀ (top r): B = U_r and A = V_rᵀ frozen, R = diag(S_r) trainable, s = 1.
The base W is not modified, so the model starts one approximate full step away from it.
"""

from collections.abc import Sequence

import torch
from rich.progress import track
from torch import nn

from .. import svd
from .loraxs import LoRAXSLayer


class LoRASBLayer(LoRAXSLayer):
    name = "lorasb"
    trainable = ("core",)
    default_lr = 2e-3
    summary = "LoRA-XS core set from the top-r SVD of the first full fine-tuning step −η·sign(G)."
    uses_alpha = False
    needs_gradient_init = True
    random_init = False

    @classmethod
    def split(cls, weight, spec, roundtrip):
        # Placeholders with B R A = 0; `init_from_gradients` sets the real factors.
        out_features, in_features = weight.shape
        return {"lora_B": weight.new_zeros(out_features, spec.rank),
                "core": weight.new_zeros(spec.rank, spec.rank),
                "lora_A": weight.new_zeros(spec.rank, in_features)}

    @torch.no_grad()
    def init_from_update(self, update: torch.Tensor) -> None:
        """B, R, A from the top-r SVD of the estimated full fine-tuning update ΔW."""
        u, s, vh = svd.top_triplets(update, self.spec.rank, self.spec.svd_niter)
        self.lora_B.copy_(u)
        self.core.copy_(torch.diag(s))
        self.lora_A.copy_(vh)


def estimate_gradients(model: nn.Module, layers: dict[str, LoRASBLayer],
                       batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """G = Σ_batches ∂L/∂W for each layer, as Σ_tokens g xᵀ from forward and tensor hooks."""
    grads = {name: torch.zeros(layer.out_features, layer.in_features, device=layer.core.device)
             for name, layer in layers.items()}

    def capture(name):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, module.in_features).float()

            def accumulate(g):
                grads[name].addmm_(g.reshape(-1, module.out_features).float().T, x)

            output.register_hook(accumulate)
        return hook

    handles = [layer.register_forward_hook(capture(name)) for name, layer in layers.items()]
    embedding_hook = model.get_input_embeddings().register_forward_hook(
        lambda module, inputs, output: output.requires_grad_(True))
    was_training = model.training
    model.eval()  # no dropout in the estimate
    device = next(iter(layers.values())).core.device
    try:
        for batch in track(batches, description="lorasb gradient estimate", total=len(batches)):
            model(**{key: value.to(device) for key, value in batch.items()}).loss.backward()
    finally:
        for handle in handles + [embedding_hook]:
            handle.remove()
        model.train(was_training)
        for layer in layers.values():
            layer.core.grad = None
    return grads


def init_from_gradients(model: nn.Module, layers: dict[str, LoRASBLayer],
                        batches: Sequence[dict[str, torch.Tensor]], lr: float) -> None:
    """Set every layer's B, R, A from ΔW = −lr·sign(G)."""
    for name, grad in estimate_gradients(model, layers, batches).items():
        layers[name].init_from_update(-lr * torch.sign(grad))
