"""The training stage: qsvd's loss equals the model's own, and its step clock and peaks."""

import copy

import pytest
import torch
from transformers import Trainer

import qsvd
from qsvd.config import FinetuneConfig
from qsvd.data import build_dataset
from qsvd.split import adapter_state
from qsvd import loss
from qsvd.loss import row_log_likelihoods
from qsvd.train import supervised_loss, train
from qsvd.batching import Batching
from conftest import char_tokenizer, tiny_model

PADDED = Batching("padded", "--batching")


def test_supervised_loss_equals_the_models_loss():
    model = tiny_model()
    ids = torch.randint(4, 100, (3, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :6] = -100  # a prompt
    labels[1, 10:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    inputs = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    expected = model(**inputs).loss
    assert torch.allclose(supervised_loss(model, inputs), expected, rtol=1e-6)
    assert torch.allclose(supervised_loss(model, inputs, num_items=20), expected * (labels[:, 1:] != -100).sum() / 20,
                          rtol=1e-6)


def force_chunks(monkeypatch, tokens: int, vocab_size: int = 128) -> None:
    """Make the loss take `tokens` supervised tokens of the tiny model's logits at a time."""
    monkeypatch.setattr(loss, "LOGIT_CHUNK_BYTES", tokens * 4 * vocab_size)


def test_chunked_loss_has_the_models_loss_and_gradients_with_one_chunk_of_logits_at_a_time(monkeypatch):
    """Chunks of 5 of the 34 supervised tokens: the same loss, adapter gradients and row
    log-likelihoods as the model's own full logits (fp32, 1e-6 relative), and the output head never
    sees more than 5 tokens at once, in forward or in backward's recompute."""
    model = qsvd.prepare(tiny_model(), "lora", bits=16, rank=4, device="cpu", progress=False)
    for name, param in model.named_parameters():
        if name.endswith("lora_B"):
            torch.nn.init.normal_(param, std=0.1)  # lora's B starts at zero: give A a gradient too
    ids = torch.randint(4, 100, (3, 16), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :6], labels[1, 10:] = -100, -100
    inputs = {"input_ids": ids, "labels": labels, "attention_mask": (labels != -100) | (torch.arange(16) < 10)}
    trainable = [param for param in model.parameters() if param.requires_grad]
    expected = model(**inputs).loss
    expected_grads = torch.autograd.grad(expected, trainable)
    with torch.no_grad():
        expected_rows = row_log_likelihoods(model, inputs)

    force_chunks(monkeypatch, 5)
    head_rows = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, output: head_rows.append(len(output)))
    chunked = supervised_loss(model, inputs)
    grads = torch.autograd.grad(chunked, trainable)
    assert head_rows == [5] * 6 + [4] + [4] + [5] * 6  # 34 tokens forward, then each chunk again in backward
    assert torch.allclose(chunked, expected, rtol=1e-6, atol=0)
    for grad, expected_grad in zip(grads, expected_grads):  # relative to the gradient's norm: only the order of the sums differs
        assert (grad - expected_grad).norm() <= 1e-6 * expected_grad.norm()
    with torch.no_grad():
        sums, counts = row_log_likelihoods(model, inputs)
    assert torch.equal(counts, expected_rows[1]) and torch.allclose(sums, expected_rows[0], rtol=1e-6)

    force_chunks(monkeypatch, 17)  # 34 tokens fill two chunks: one pass, the head never recomputed
    head_rows.clear()
    one_pass = supervised_loss(model, inputs)
    torch.autograd.grad(one_pass, trainable)
    assert head_rows == [34] and torch.allclose(one_pass, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_supervised_tokens_trainer_trains_as_trainer_does(grad_accum, tmp_path, monkeypatch):
    """Two optimizer steps with qsvd's trainer (its loss in chunks of 16 tokens) and with
    transformers' land on the same adapter."""
    force_chunks(monkeypatch, 16)
    tokenizer = char_tokenizer()
    config = FinetuneConfig.resolve(method="lora", batch_size=2, grad_accum=grad_accum, max_steps=2,
                                    seq_len=512, lr=1e-2, warmup_ratio=0.0, optim="adamw_torch")
    dataset = build_dataset(None, tokenizer, config.seq_len, config.seed)
    model = qsvd.prepare(tiny_model(), "lora", bits=16, rank=4, device="cpu", progress=False)
    ours, theirs = model, copy.deepcopy(model)
    initial = {name: tensor.clone() for name, tensor in adapter_state(model).items()}
    ours_outcome = train(ours, tokenizer, dataset, config, tmp_path / "ours", batching=PADDED)
    theirs_outcome = train(theirs, tokenizer, dataset, config, tmp_path / "theirs", trainer_class=Trainer,
                           batching=PADDED)
    assert ours_outcome.final_loss == pytest.approx(theirs_outcome.final_loss, rel=1e-5)
    for name, tensor in adapter_state(theirs).items():
        assert torch.allclose(adapter_state(ours)[name], tensor, rtol=1e-4, atol=1e-6), name
    assert not torch.equal(adapter_state(ours)["model.layers.0.self_attn.q_proj.lora_B"],
                           initial["model.layers.0.self_attn.q_proj.lora_B"])  # it trained
    assert len(ours_outcome.step_seconds) == 2 and all(s > 0 for s in ours_outcome.step_seconds)
    assert [e["step_seconds"] for e in ours_outcome.log_history if "loss" in e] == \
        [round(s, 4) for s in ours_outcome.step_seconds]
    assert ours_outcome.train_peak_memory_mb > 0 and ours_outcome.setup_peak_memory_mb > 0


@pytest.mark.parametrize("capability, requested, dtype", [
    ((7, 5), "auto", torch.float16), ((8, 0), "auto", torch.bfloat16), ((9, 0), "auto", torch.bfloat16),
    ((9, 0), "fp16", torch.float16), ((7, 5), "fp32", torch.float32), ((8, 6), "bf16", torch.bfloat16)])
def test_the_compute_dtype_and_loss_scaling_follow_the_gpu_unless_asked(capability, requested, dtype, monkeypatch,
                                                                         tmp_path):
    """--dtype auto: a T4 (compute capability 7.5) reports bf16 as supported through emulation, so
    qsvd takes fp16 there, which Trainer trains with its loss scaler, and bf16 from capability 8.0
    on; any other --dtype is taken as asked (bf16 where the GPU has it: tests/test_gpu_paths.py)."""
    from qsvd.devices import compute_dtype
    from qsvd.methods import make_spec
    from qsvd.train import training_arguments

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr("transformers.training_args.is_torch_bf16_gpu_available", lambda: True)  # no GPU here
    assert compute_dtype(torch.device("cuda"), make_spec("edora", 16, dtype=requested)) == dtype
    args = training_arguments(FinetuneConfig(dtype=requested), tmp_path, dtype, PADDED)
    assert (args.fp16, args.bf16) == (dtype == torch.float16, dtype == torch.bfloat16)  # fp16: a GradScaler
    assert compute_dtype(torch.device("cpu"), make_spec("edora", 16, dtype="auto")) == torch.float32


def test_every_block_and_the_head_hand_their_freed_memory_back_after_forward_and_before_backward(tmp_path, monkeypatch):
    """One step on a CPU: each of the 2 blocks and the head (one chunk of logits) trims after its
    forward and again when its output's gradient arrives, before its own backward; the hooks are
    gone after training."""
    from qsvd import train as train_module

    calls = []
    monkeypatch.setattr(train_module, "return_freed_memory", lambda collect=False: calls.append(collect))
    tokenizer = char_tokenizer()
    config = FinetuneConfig.resolve(method="lora", batch_size=2, max_steps=1, seq_len=512, optim="adamw_torch")
    model = qsvd.prepare(tiny_model(), "lora", bits=16, rank=4, device="cpu", progress=False)
    train(model, tokenizer, build_dataset(None, tokenizer, config.seq_len, config.seed), config, tmp_path)
    assert calls.count(False) == 2 * 3  # beside the one full pass (collect=True) before training
    assert not any(module._forward_hooks for module in [*model.model.layers, model.lm_head])


def test_lorasb_init_lr_is_full_fine_tunings_first_step():
    """η = lr / (warmup_ratio · batches of the whole data at the estimate's batch size · epochs),
    whatever --max-steps; --init-lr sets it; without a warm-up it is the lr itself; under DPO, DPO's."""
    from qsvd.train import init_step

    config = FinetuneConfig.resolve(method="lorasb", lr=2e-3, warmup_ratio=0.02, batch_size=10)
    assert init_step(config, 170_000).lr == pytest.approx(2e-3 / (0.02 * 17_000))
    assert init_step(FinetuneConfig.resolve(method="lorasb", lr=2e-3, warmup_ratio=0.02, batch_size=10,
                                            epochs=2), 170_000).lr == pytest.approx(2e-3 / (0.02 * 34_000))
    for steps in (1, 16, 10_000):
        short = FinetuneConfig.resolve(method="lorasb", lr=2e-3, batch_size=4, max_steps=steps)
        assert init_step(short, 2251).lr == pytest.approx(2e-3 / (0.03 * 563))
    assert init_step(FinetuneConfig.resolve(method="lorasb", lr=2e-3, warmup_ratio=0.0), 2251).lr == 2e-3
    assert init_step(FinetuneConfig.resolve(method="lorasb", lr=2e-3), 10).lr == 2e-3  # under one warm-up step
    assert init_step(FinetuneConfig.resolve(method="lorasb", init_lr=5e-6), 2251).lr == 5e-6
    # DPO's start is its reference: η is full fine-tuning's DPO lr, whatever the data; ORPO's is SFT's rule
    assert init_step(FinetuneConfig.resolve(method="lorasb", objective="dpo", lr=2e-3), 10).lr == 1e-6
    assert init_step(FinetuneConfig.resolve(method="lorasb", objective="dpo", init_lr=5e-6), 10).lr == 5e-6
    assert init_step(FinetuneConfig.resolve(method="lorasb", objective="orpo", lr=2e-3), 10).lr == 2e-3
