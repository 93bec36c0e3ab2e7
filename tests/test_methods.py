"""The invariants of ../shared/docs/methods.md, for every method at bits 16 and 4."""

import pytest
import torch

import qsvd
from qsvd import quantize
from qsvd.methods import METHODS
from qsvd.methods.lorasb import estimate_gradients, init_from_gradients, layer_groups
from qsvd.loss import supervised_loss
from qsvd.split import adapter_state, find_targets
from conftest import tiny_model

BITS = [16, 4]
RANK = 4
IDS = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(1))
BATCH = {"input_ids": IDS, "labels": IDS}


def prepared(method, bits, **options):
    if METHODS[method].needs_gradient_init:
        options.setdefault("grad_batches", [BATCH])
        options.setdefault("lr", 1e-3)
    return qsvd.prepare(tiny_model(), method, bits=bits, rank=RANK, device="cpu", progress=False, **options)


def original_weights():
    return {name: layer.weight.detach().clone() for name, layer in find_targets(tiny_model()).items()}


def adapter_layers(model):
    return {name: model.get_submodule(name) for name in model.qsvd_targets}


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def trainable_per_layer(method, out_features, in_features, r=RANK):
    return {"lora": r * (in_features + out_features), "pissa": r * (in_features + out_features),
            "milora": r * (in_features + out_features), "dora": r * (in_features + out_features) + out_features,
            "loraxs": r * r, "lorasb": r * r, "edora": r * r + out_features}[method]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", list(METHODS))
def test_only_listed_parameters_train(method, bits):
    model = prepared(method, bits)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    layers = adapter_layers(model)
    expected = {f"{name}.{key}" for name in layers for key in METHODS[method].trainable}
    assert trainable == expected
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == sum(trainable_per_layer(method, l.out_features, l.in_features) for l in layers.values())
    for layer in layers.values():
        if bits == 4:
            assert layer.base.weight.dtype == torch.uint8  # the frozen part really is packed NF4
            assert layer.base.weight.quant_state.nested  # with double quantization


@pytest.mark.parametrize("method", ["pissa", "milora"])
def test_pissa_milora_bits16_reproduce_w(method):
    model = prepared(method, 16)
    for name, weight in original_weights().items():
        layer = model.get_submodule(name)
        rebuilt = layer.base_weight() + layer.adapter_delta()
        assert torch.allclose(rebuilt, weight, atol=1e-5, rtol=0)
    assert torch.allclose(logits(model), logits(tiny_model()), atol=1e-5)


def test_milora_takes_the_smallest_triplets_exactly():
    model = prepared("milora", 16)
    for name, weight in original_weights().items():
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        bottom = (u[:, -RANK:] * s[-RANK:]) @ vh[-RANK:]
        delta = model.get_submodule(name).adapter_delta().double()
        assert torch.allclose(delta, bottom, atol=1e-5), name


def test_pissa_takes_the_top_triplets():
    model = prepared("pissa", 16)
    for name, weight in original_weights().items():
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        top = (u[:, :RANK] * s[:RANK]) @ vh[:RANK]
        assert torch.allclose(model.get_submodule(name).adapter_delta().double(), top, atol=1e-5)


def qlora_error(weight):
    return torch.linalg.norm(weight - quantize.roundtrip(weight, 4, torch.float32))


def test_pissa_bits4_refined_error_below_qlora():
    model = prepared("pissa", 4, refine_iters=5)
    for name, weight in original_weights().items():
        layer = model.get_submodule(name)
        error = torch.linalg.norm(weight - layer.base_weight() - layer.adapter_delta())
        assert error <= qlora_error(weight), name


def test_milora_bits4_error_about_qlora():
    model = prepared("milora", 4)
    for name, weight in original_weights().items():
        layer = model.get_submodule(name)
        error = torch.linalg.norm(weight - layer.base_weight() - layer.adapter_delta())
        assert error <= 1.1 * qlora_error(weight), name


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", ["lora", "dora", "loraxs", "edora"])
def test_zero_adapter_gives_base_logits(method, bits):
    """B = 0 (lora, dora) or R = 0 (loraxs, edora): the output is the frozen base's, Q(W)."""
    quantized_base = prepared("lora", bits)  # B = 0: exactly deq(Q(W)) x
    model = prepared(method, bits, core_init="zeros")
    assert torch.allclose(logits(model), logits(quantized_base), atol=1e-5)
    if bits == 16:
        assert torch.allclose(logits(model), logits(tiny_model()), atol=1e-5)


def direct_row_norm(layer):
    return torch.linalg.vector_norm(layer.base_weight() + layer.adapter_delta(), dim=1)


def dense_magnitude_output(layer, x):
    """(m / n) ⊙ (W' x) + b with W' = deq(Q(W)) + adapter, and n taken directly from W'."""
    weight = layer.base_weight() + layer.adapter_delta()
    bias = 0 if layer.base.bias is None else layer.base.bias
    return layer.magnitude / torch.linalg.vector_norm(weight, dim=1) * (x @ weight.T) + bias


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", ["dora", "edora"])
def test_fast_norm_equals_direct_norm(method, bits):
    """n from init-time statistics (edora) or P = W Aᵀ riding the base matmul (dora) is exact."""
    model = qsvd.prepare(tiny_model(bias=True), method, bits=bits, rank=RANK, device="cpu", progress=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x = torch.randn(2, 3, 128)
    for step in range(4):  # at init, then after training steps that move the adapter far from init
        for layer in adapter_layers(model).values():
            with torch.no_grad():
                assert torch.allclose(layer.weight_norm(), direct_row_norm(layer), rtol=1e-5, atol=0), step
                inputs = x[..., :layer.in_features]
                assert torch.allclose(layer(inputs), dense_magnitude_output(layer, inputs), rtol=1e-4, atol=1e-5)
        model(**BATCH).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = {"dora": "lora_B", "edora": "core"}[method]
    assert any(getattr(layer, moved).abs().max() > 0.01 for layer in adapter_layers(model).values())


@pytest.mark.parametrize("method", ["dora", "edora"])
def test_magnitude_methods_never_dequantize_while_training(method, monkeypatch):
    model = prepared(method, 4)
    monkeypatch.setattr("qsvd.methods.base.dequantize", lambda *a: pytest.fail("dequantized for n"))
    model(**BATCH).loss.backward()


def saved_for_backward(model, batch) -> list[torch.Tensor]:
    """Every tensor one training forward keeps for its backward (no gradient checkpointing)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = supervised_loss(model.train(), batch)
    loss.backward()
    return saved


def test_magnitude_methods_keep_no_more_for_backward_than_lora_on_padded_rows():
    """The guard on EDoRA's and DoRA's training memory (issue 31): on a padded batch of uneven rows,
    the largest tensor kept for backward is no larger than LoRA's (no dense out × in weight, no
    per-token buffer wider than LoRA's), and EDoRA keeps at most 3% more bytes than LoRA in all: one
    r-wide activation a layer more, for the magnitude's gradient through the out × r factor (an out-wide
    one a layer is about +30% at these widths)."""
    ids = torch.randint(4, 100, (4, 64), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(64) < torch.tensor([[64], [40], [20], [52]])).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :10] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    models = {method: prepared(method, 4) for method in ("lora", "dora", "edora")}
    kept = {method: saved_for_backward(model, batch) for method, model in models.items()}
    largest = {method: max(t.numel() * t.element_size() for t in tensors) for method, tensors in kept.items()}
    total = {method: sum(t.numel() * t.element_size() for t in tensors) for method, tensors in kept.items()}
    assert largest["edora"] <= largest["lora"] and largest["dora"] <= largest["lora"], largest
    assert total["edora"] <= 1.03 * total["lora"], total
    weights = {tuple(layer.weight.shape) for layer in find_targets(tiny_model()).values()}
    for method in ("dora", "edora"):  # made in the step, not a parameter (such as the output head's weight)
        own = {t.untyped_storage().data_ptr() for t in [*models[method].parameters(), *models[method].buffers()]}
        assert not any(tuple(t.shape) in weights and t.is_floating_point() and t.untyped_storage().data_ptr() not in own
                       for t in kept[method]), method


@pytest.mark.parametrize("bits", BITS)
def test_dora_magnitude_is_base_row_norm(bits):
    model = prepared("dora", bits)
    for layer in adapter_layers(model).values():
        assert torch.allclose(layer.magnitude, torch.linalg.vector_norm(layer.base_weight(), dim=1))


def autograd_weight_gradients():
    model = tiny_model()
    targets = find_targets(model)
    model(**BATCH).loss.backward()
    return {name: layer.weight.grad for name, layer in targets.items()}


def lorasb_at_base(bits):
    """A lorasb model with R = 0: the frozen base alone, as during the gradient estimate."""
    model = prepared("lorasb", bits)
    for layer in adapter_layers(model).values():
        layer.core.data.zero_()
    return model


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lorasb_hook_gradient_equals_autograd(checkpointing):
    """Σ g xᵀ from the hooks is ∂L/∂W, also when the backward recomputes checkpointed layers."""
    model = lorasb_at_base(16)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    hooked = estimate_gradients(model, adapter_layers(model), [BATCH])
    for name, grad in autograd_weight_gradients().items():
        assert torch.allclose(hooked[name], grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("bits", BITS)
def test_lorasb_core_is_best_rank_r_of_sign_step(bits):
    lr = 1e-3
    model = prepared("lorasb", bits, lr=lr)
    at_base = lorasb_at_base(bits)
    grads = estimate_gradients(at_base, adapter_layers(at_base), [BATCH])
    for name, layer in adapter_layers(model).items():
        update = (-lr * torch.sign(grads[name])).double()
        u, s, vh = torch.linalg.svd(update, full_matrices=False)
        best = (u[:, :RANK] * s[:RANK]) @ vh[:RANK]
        assert layer.scale == 1.0
        assert torch.allclose(layer.adapter_delta().double(), best, atol=1e-6), name
        eye = torch.eye(RANK)
        assert torch.allclose(layer.lora_B.T @ layer.lora_B, eye, atol=1e-5)
        assert torch.allclose(layer.lora_A @ layer.lora_A.T, eye, atol=1e-5)
        assert torch.count_nonzero(layer.core - torch.diag(torch.diagonal(layer.core))) == 0


def lorasb_factors(model):
    return {name: (layer.lora_B.clone(), layer.core.clone(), layer.lora_A.clone())
            for name, layer in adapter_layers(model).items()}


@pytest.mark.parametrize("bits", BITS)
def test_lorasb_grouped_estimate_equals_all_at_once(bits):
    """One layer a group (the batches run 8 times) gives the factors of one pass over all layers."""
    everything, grouped = lorasb_at_base(bits), lorasb_at_base(bits)
    layers = adapter_layers(grouped)
    one_layer = min(4 * l.out_features * l.in_features for l in layers.values())
    assert len(layer_groups(layers, one_layer)) == len(layers)
    init_from_gradients(everything, adapter_layers(everything), [BATCH, BATCH], 1e-3, budget_bytes=2**40)
    init_from_gradients(grouped, layers, [BATCH, BATCH], 1e-3, budget_bytes=one_layer)
    for name, (B, R, A) in lorasb_factors(everything).items():
        B2, R2, A2 = lorasb_factors(grouped)[name]
        assert torch.allclose(B @ R @ A, B2 @ R2 @ A2, atol=1e-7), name
        assert R.abs().max() > 0


def test_layer_groups_fit_the_budget():
    layers = adapter_layers(lorasb_at_base(16))
    sizes = {name: 4 * l.out_features * l.in_features for name, l in layers.items()}
    budget = 3 * max(sizes.values())
    groups = layer_groups(layers, budget)
    assert [name for group in groups for name in group] == list(layers)  # every layer once, in order
    assert all(sum(sizes[name] for name in group) <= budget for group in groups)
    assert 1 < len(groups) < len(layers)


def test_lorasb_sketch_is_exact_for_low_rank_gradients():
    """With 4 tokens G has rank ≤ 4 < k = 2r + 1, so the single-pass sketch recovers G."""
    model = lorasb_at_base(16)
    short = {"input_ids": IDS[:1, :4], "labels": IDS[:1, :4]}
    dense = estimate_gradients(model, adapter_layers(model), [short])
    sketched = estimate_gradients(model, adapter_layers(model), [short], sketch=True)
    for name, grad in dense.items():
        assert torch.linalg.norm(sketched[name] - grad) <= 1e-4 * torch.linalg.norm(grad), name


def test_lorasb_sketch_approximates_full_rank_gradients():
    model = lorasb_at_base(16)
    dense = estimate_gradients(model, adapter_layers(model), [BATCH])
    sketched = estimate_gradients(model, adapter_layers(model), [BATCH], sketch=True)
    for name, grad in dense.items():
        tail = torch.linalg.norm(torch.linalg.svdvals(grad)[RANK:])  # ‖G − best rank-r of G‖
        # Tropp et al. 2017, Thm 4.3 with k = 2r + 1: E‖G − Ĝ‖² ≤ 4·tail² (up to the Ψ factor)
        assert torch.linalg.norm(sketched[name] - grad) <= 2 * tail, name


def test_lorasb_starts_away_from_base():
    assert not torch.allclose(logits(prepared("lorasb", 16)), logits(tiny_model()), atol=1e-4)


@pytest.mark.parametrize("method", list(METHODS))
def test_bits8_forward_matches_dequantized_weight(method):
    """int8 storage: the base multiplies by deq(Q(W)), up to LLM.int8's row-wise input rounding."""
    model = prepared(method, 8)
    for layer in adapter_layers(model).values():
        assert layer.base.weight.dtype == torch.int8
        x = torch.randn(3, layer.in_features)
        expected = x @ layer.base_weight().T
        assert torch.linalg.norm(layer.base(x) - expected) < 0.02 * torch.linalg.norm(expected)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("method", list(METHODS))
def test_restore_from_saved_tensors_gives_same_logits(method, bits):
    model = prepared(method, bits)
    with torch.no_grad():  # move every trainable tensor away from its init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    state = adapter_state(model)
    restored = qsvd.split.restore(tiny_model(), model.qsvd_spec, model.qsvd_targets, state,
                                  device="cpu", progress=False)
    assert torch.equal(logits(restored), logits(model))


def test_rank_too_large_names_the_layer():
    with pytest.raises(qsvd.QSVDError, match=r"--rank 65 .* model\.layers\.0\.self_attn\.q_proj"):
        qsvd.prepare(tiny_model(), "lora", rank=65, device="cpu", progress=False)


def test_targets_matching_nothing_lists_what_exists():
    with pytest.raises(qsvd.QSVDError, match="q_proj"):
        qsvd.prepare(tiny_model(), "lora", targets=["attn_qkv"], device="cpu", progress=False)


def test_targets_select_layers():
    model = qsvd.prepare(tiny_model(), "lora", targets=["q_proj", "v_proj"], rank=2, device="cpu", progress=False)
    assert [name.rsplit(".", 1)[1] for name in model.qsvd_targets] == ["q_proj", "v_proj"] * 2


@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "milora", "loraxs", "edora"])
def test_layers_with_bias_start_at_the_base_output(method):
    model = qsvd.prepare(tiny_model(bias=True), method, bits=16, rank=RANK, core_init="zeros",
                         device="cpu", progress=False)
    assert torch.allclose(logits(model), logits(tiny_model(bias=True)), atol=1e-5)
