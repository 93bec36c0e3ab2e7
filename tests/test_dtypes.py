"""The GPU's compute dtypes, run on this CPU: every method at bf16 and at fp16 (with the loss
scaler a GPU's fp16 training uses) splits to its invariants within the dtype's precision, trains,
resumes exactly, evaluates and exports."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import qsvd
from qsvd.data import read_eval_rows
from qsvd.evaluate import evaluate_model
from qsvd.methods import METHODS
from qsvd.devices import DTYPES, compute_dtype
from qsvd.methods import make_spec
from qsvd.split import adapter_layers, find_targets
from qsvd.batching import Batching
from conftest import char_tokenizer, killed_after_step, tiny_model

DTYPE_NAMES = ["bf16", "fp16"]
TOLERANCE = {name: 10 * torch.finfo(DTYPES[name]).eps for name in DTYPE_NAMES}  # on logits below 1, after 2 blocks
IDS = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(1))

PADDED = Batching("padded", "--batching")


def prepared(method, dtype, bits=4, **options):
    if METHODS[method].needs_gradient_init:
        options |= {"grad_batches": [{"input_ids": IDS, "labels": IDS}], "lr": 1e-3}
    return qsvd.prepare(tiny_model(), method, bits=bits, rank=4, dtype=dtype, device="cpu", progress=False, **options)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
def test_every_method_splits_to_its_invariants_in_the_dtype(dtype):
    """The model computes in the dtype (frozen 4-bit layers, norms, embeddings; the adapter stays
    fp32); a zero adapter gives the quantized base's logits; pissa and milora at 16 bits rebuild W
    to the dtype's rounding; lorasb's B and A are orthonormal around a diagonal core."""
    torch_dtype = DTYPES[dtype]
    base = prepared("lora", dtype)  # B = 0: deq(Q(W)) x in the dtype
    assert base.get_input_embeddings().weight.dtype == torch_dtype
    assert all(layer.base.compute_dtype == torch_dtype and layer.lora_A.dtype == torch.float32
               for layer in adapter_layers(base).values())
    fp32_logits = logits(prepared("lora", "fp32"))
    assert 0 < (logits(base) - fp32_logits).abs().max() < TOLERANCE[dtype]  # computed in the dtype, close to fp32
    for method in ["dora", "loraxs", "edora"]:
        zero = prepared(method, dtype, core_init="zeros")
        assert (logits(zero) - logits(base)).abs().max() < TOLERANCE[dtype], method
    original = {name: linear.weight for name, linear in find_targets(tiny_model()).items()}
    for method in ["pissa", "milora"]:
        model = prepared(method, dtype, bits=16)
        for name, layer in adapter_layers(model).items():
            rebuilt = layer.base_weight().float() + layer.adapter_delta()
            assert (rebuilt - original[name]).abs().max() <= 2 * torch.finfo(torch_dtype).eps * original[name].abs().max()
    for layer in adapter_layers(prepared("lorasb", dtype)).values():
        eye = torch.eye(4)
        assert torch.allclose(layer.lora_B.T @ layer.lora_B, eye, atol=1e-5)
        assert torch.allclose(layer.lora_A @ layer.lora_A.T, eye, atol=1e-5)
        assert torch.count_nonzero(layer.core - torch.diag(torch.diagonal(layer.core))) == 0 < layer.core.abs().sum()


def test_the_dtype_is_checked_and_auto_keeps_the_device_rule():
    with pytest.raises(qsvd.QSVDError, match="--dtype must be one of auto, fp32, bf16, fp16; got 'fp8'"):
        make_spec("edora", 4, dtype="fp8")
    assert compute_dtype(torch.device("cpu"), make_spec("edora", 4)) == torch.float32
    assert compute_dtype(torch.device("cpu"), make_spec("edora", 4, dtype="fp16")) == torch.float16


@pytest.fixture(scope="module")
def one_row_data(tmp_path_factory):
    """One question, eight times: three steps on it must lower its loss."""
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps({"question": "What is 12 + 30?", "answer": "12 + 30 = 42. The answer is 42."})
                            + "\n" for _ in range(8)))
    path.with_suffix(".txt").write_text("What is 12 + 30? 12 + 30 = 42. The answer is 42.\n" * 4)
    return path


BATCHING = {"bf16": "packed", "fp16": "padding-free"}  # the flattened batches in each dtype (fp32's default: padding-free)


def run_options(model_dir, data, output, dtype, method):
    return dict(model=str(model_dir), method=method, dtype=dtype, rank=4, batch_size=2, max_steps=3, lr=2e-2,
                warmup_ratio=0.0, data=str(data), save_steps=1, output=str(output), seq_len=128,
                batching=BATCHING[dtype])


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_resumes_evaluates_and_exports_in_the_dtype(method, dtype, tiny_model_dir, one_row_data,
                                                                       tmp_path, monkeypatch):
    options = run_options(tiny_model_dir, one_row_data, tmp_path / "run", dtype, method)
    trained = qsvd.finetune(**options).model
    record = json.loads((tmp_path / "run" / "qsvd_config.json").read_text())
    assert record["compute_dtype"] == str(DTYPES[dtype]).removeprefix("torch.") and record["spec"]["dtype"] == dtype
    assert record["batching"] == BATCHING[dtype]
    losses = [entry["loss"] for entry in map(json.loads, (tmp_path / "run" / "train_log.jsonl").read_text().splitlines())
              if "loss" in entry]
    assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses))) and losses[2] < losses[0], losses

    with monkeypatch.context() as patch:  # killed after step 2's checkpoint, then resumed
        killed_after_step(2, patch)
        with pytest.raises(KeyboardInterrupt):
            qsvd.finetune(**options | {"output": str(tmp_path / "killed")})
    qsvd.finetune(**options | {"output": str(tmp_path / "killed"), "resume": True})
    assert (tmp_path / "killed" / "adapter.safetensors").read_bytes() == \
        (tmp_path / "run" / "adapter.safetensors").read_bytes()

    text = one_row_data.with_suffix(".txt")
    rebuilt = qsvd.evaluate(tmp_path / "run", text, task="ppl")  # the run rebuilt in its dtype
    in_memory = evaluate_model(trained, char_tokenizer(), read_eval_rows(text, "--data"), "ppl", tmp_path / "p.jsonl")
    assert rebuilt.perplexity == pytest.approx(in_memory.perplexity, rel=1e-5) and rebuilt.tokens == in_memory.tokens

    qsvd.export(tmp_path / "run", tmp_path / "peft")
    qsvd.export(tmp_path / "run", tmp_path / "merged", format="merged", dtype="fp32")
    assert set(load_file(tmp_path / "peft" / "adapter_model.safetensors")) and \
        (tmp_path / "merged" / "model.safetensors").is_file()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "peft")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(logits(peft_model), logits(merged), atol=1e-4)
    assert (logits(merged) - logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir))).abs().max() > 1e-3


def test_fp16_trains_with_a_gpus_loss_scaler_and_autocast_on_this_cpu(tmp_path):
    """accelerate keeps fp16's GradScaler and autocast for accelerators; qsvd's trainer takes them
    on a CPU too, so the fp16 steps above ran the T4's path: scaled loss, unscaled and checked gradients."""
    from qsvd.config import FinetuneConfig
    from qsvd.train import SupervisedTokensTrainer, training_arguments

    model = prepared("edora", "fp16")
    trainer = SupervisedTokensTrainer(model=model, args=training_arguments(FinetuneConfig(), tmp_path, torch.float16, PADDED))
    assert isinstance(trainer.accelerator.scaler, torch.amp.GradScaler) and trainer.accelerator.scaler.is_enabled()
    assert trainer.accelerator.native_amp and trainer.accelerator.mixed_precision == "fp16"
