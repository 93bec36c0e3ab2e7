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
from ..console import console
from ..errors import QSVDError
from ..loss import supervised_loss
from ..memory import free_memory_bytes, group_by_size, return_freed_memory
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
    def initial_tensors(cls, weight, spec, roundtrip):
        # Placeholders with B R A = 0; `init_from_gradients` sets the real factors.
        out_features, in_features = weight.shape
        return {"lora_B": weight.new_zeros(out_features, spec.rank),
                "core": weight.new_zeros(spec.rank, spec.rank),
                "lora_A": weight.new_zeros(spec.rank, in_features)}

    @classmethod
    def init_from_gradients(cls, model, layers, batches, lr, budget_bytes=None, sketch=False, loss=supervised_loss):
        init_from_gradients(model, layers, batches, lr, budget_bytes, sketch, loss)

    @torch.no_grad()
    def set_factors(self, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> None:
        """B = U_r, R = diag(S_r), A = V_rᵀ from the top-r SVD of the estimated update ΔW."""
        self.lora_B.copy_(u)
        self.core.copy_(torch.diag(s))
        self.lora_A.copy_(vh)


SKETCH_SEED = 0
INIT_LOSS_SCALE = 2.0**16  # the estimate's first loss scale, GradScaler's


class DenseGradient:
    """G = Σ_tokens g xᵀ, held in full (out × in fp32)."""

    def __init__(self, layer: LoRASBLayer):
        self.sum = torch.zeros(layer.out_features, layer.in_features, device=layer.core.device)

    def add(self, g: torch.Tensor, x: torch.Tensor) -> None:
        self.sum.addmm_(g.T, x)

    def value(self) -> torch.Tensor:
        return self.sum


class SketchedGradient:
    """A single-pass sketch of G (Tropp et al. 2017): Y = G Ω and Z = Ψ G, with k = 2r + 1 and
    l = 2k + 1 Gaussian test vectors; Ĝ = Q (Ψ Q)⁺ Z with Q = orth(Y) is G's rank-k approximation.

    It holds (out·k + l·in) numbers instead of out·in, so every layer fits in one pass; the sign
    step is then taken of Ĝ, which equals G where G has rank ≤ k and approximates it elsewhere.
    """

    def __init__(self, layer: LoRASBLayer, generator: torch.Generator):
        k = 2 * layer.spec.rank + 1
        device = layer.core.device
        self.omega = torch.randn(layer.in_features, k, generator=generator).to(device)
        self.psi = torch.randn(2 * k + 1, layer.out_features, generator=generator).to(device)
        self.range = torch.zeros(layer.out_features, k, device=device)  # Y = G Ω
        self.corange = torch.zeros(2 * k + 1, layer.in_features, device=device)  # Z = Ψ G

    def add(self, g: torch.Tensor, x: torch.Tensor) -> None:
        self.range.addmm_(g.T, x @ self.omega)
        self.corange.addmm_((g @ self.psi.T).T, x)

    def value(self) -> torch.Tensor:
        q = torch.linalg.qr(self.range.double()).Q
        core = torch.linalg.lstsq(self.psi.double() @ q, self.corange.double()).solution
        return (q @ core).float()


def estimate_gradients(model: nn.Module, layers: dict[str, LoRASBLayer],
                       batches: Sequence[dict[str, torch.Tensor]], sketch: bool = False,
                       description: str = "lorasb gradient estimate", loss=supervised_loss) -> dict[str, torch.Tensor]:
    """G = Σ_batches ∂L/∂W for each of `layers`, L = `loss(model, batch)`, as Σ_tokens g xᵀ from forward and tensor hooks
    (so the base may stay 4-bit); with `sketch`, each layer's single-pass rank-k sketch Ĝ.

    The backward pass runs on S·L and each g is divided by S again in fp32, as a GradScaler does:
    in fp16 the per-token g of 1e-6 to 1e-8 would otherwise underflow. S starts at 2¹⁶ (exact for
    every dtype); where a g overflows, S halves and the batch runs again for the layers whose g
    was not yet taken (backward reaches the overflow before any layer that depends on it).
    """
    if sketch:
        generator = torch.Generator().manual_seed(SKETCH_SEED)
        accumulators = {name: SketchedGradient(layer, generator) for name, layer in layers.items()}
    else:
        accumulators = {name: DenseGradient(layer) for name, layer in layers.items()}
    scale, taken, overflow = INIT_LOSS_SCALE, set(), []  # taken: the layers this batch has added

    def capture(name):
        def hook(module, inputs, output):
            x = inputs[0].detach()  # kept until the backward pass, in the compute dtype

            def add(g):
                if name in taken or overflow:
                    return
                g = g.reshape(-1, module.out_features).float()
                if not torch.isfinite(g).all():
                    overflow.append(name)
                    return
                accumulators[name].add(g / scale, x.reshape(-1, module.in_features).float())
                taken.add(name)

            output.register_hook(add)
        return hook

    handles = [layer.register_forward_hook(capture(name)) for name, layer in layers.items()]
    embedding_hook = model.get_input_embeddings().register_forward_hook(
        lambda module, inputs, output: output.requires_grad_(True))
    was_training = model.training
    model.eval()  # no dropout in the estimate ...
    checkpointed = [module for module in model.modules() if getattr(module, "gradient_checkpointing", False)]
    for module in checkpointed:
        module.training = True  # ... but layers with gradient checkpointing on recompute, as in training
    device = next(iter(layers.values())).core.device
    try:
        for batch in track(batches, description=description, total=len(batches), console=console):
            batch = {key: value.to(device) for key, value in batch.items()}
            taken.clear()
            while True:
                overflow.clear()
                (scale * loss(model, batch)).backward()
                if not overflow:
                    break
                if scale <= 1:
                    raise QSVDError(f"lorasb's gradient estimate is not finite at layer {overflow[0]}; "
                                    "check the data, or use --dtype bf16 or fp32")
                scale /= 2
    finally:
        for handle in handles + [embedding_hook]:
            handle.remove()
        model.train(was_training)
        for layer in layers.values():
            layer.core.grad = None
    return {name: accumulator.value() for name, accumulator in accumulators.items()}


def layer_groups(layers: dict[str, LoRASBLayer], budget_bytes: int) -> list[list[str]]:
    """Consecutive layers whose fp32 gradients (4·out·in bytes each) fit in the budget together;
    a layer larger than the budget forms a group of its own."""
    return group_by_size({name: 4 * layer.out_features * layer.in_features for name, layer in layers.items()},
                         budget_bytes)


def init_from_gradients(model: nn.Module, layers: dict[str, LoRASBLayer],
                        batches: Sequence[dict[str, torch.Tensor]], lr: float,
                        budget_bytes: int | None = None, sketch: bool = False, loss=supervised_loss) -> None:
    """Set every layer's B, R, A from ΔW = −lr·sign(G), G the gradient of `loss(model, batch)`
    (the objective that will be trained: supervised, or a preference loss at the start).

    G is taken at the base model for every layer: one group of layers at a time within
    `budget_bytes` of gradients (default: half the free memory), the batches repeated for each
    group, and the factors set only once all groups are done; or, with `sketch`, one pass.
    """
    device = next(iter(layers.values())).core.device
    if sketch:
        groups = [list(layers)]
    else:
        budget_bytes = budget_bytes or free_memory_bytes(device) // 2
        groups = layer_groups(layers, budget_bytes)
        if len(groups) > 1:
            console.print(f"lorasb: gradients of {len(layers)} layers in {len(groups)} groups within "
                          f"{budget_bytes / 2**20:,.4g} MB; the {len(batches)} batches run once per group")
    factors = {}
    for index, group in enumerate(groups, 1):
        description = "lorasb gradient estimate" + (f", group {index}/{len(groups)}" if len(groups) > 1 else "")
        grads = estimate_gradients(model, {name: layers[name] for name in group}, batches, sketch, description, loss)
        for name in group:
            factors[name] = svd.top_triplets(-lr * torch.sign(grads.pop(name)), layers[name].spec.rank,
                                             layers[name].spec.svd_niter)
        return_freed_memory()
    for name, (u, s, vh) in factors.items():
        layers[name].set_factors(u, s, vh)
