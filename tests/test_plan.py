"""`qsvd plan`: its parts equal what a prepared model really holds, its total is the measured peak
of real runs within 15%; it needs no weights; it advises."""

import shutil

import pytest
from click.testing import CliRunner
from transformers import Gemma2Config

from qsvd.cli import cli
from qsvd.plan import Setup, budget
from qsvd.split import adapter_layers, prepare

from conftest import BENCHMARKS, last_json_line, tiny_model


@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "milora", "loraxs", "edora"])
def test_parts_equal_a_prepared_model(method, tiny_model_dir):
    model = prepare(tiny_model(), method, bits=4, rank=4, device="cpu", progress=False)
    layers = adapter_layers(model).values()
    adapter = sum(t.numel() * t.element_size() for layer in layers
                  for name, t in [*layer.named_parameters(), *layer.named_buffers()] if not name.startswith("base."))
    frozen = sum(layer.base.weight.numel() * layer.base.weight.element_size()
                 + layer.base.weight.quant_state.absmax.numel() + 4 * layer.base.weight.quant_state.state2.absmax.numel()
                 for layer in layers)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    parts = budget(Setup(model=str(tiny_model_dir), method=method, bits=4, rank=4))
    assert parts["adapter"] == adapter and parts["gradients"] == 4 * trainable
    assert abs(parts["frozen targets"] - frozen) / frozen < 0.01


def test_plan_holds_one_chunk_of_logits_unless_the_model_changes_its_logits(tmp_path):
    """Llama 3 at 2048 tokens: 261 tokens' logits (128 MiB in fp32) as their log-softmax, its gradient
    and the logits' gradient, not 2048; at up to two chunks' tokens (522) one pass, which holds all
    of them as two copies; Gemma 2 soft-caps its logits, so its loss takes them whole."""
    llama3 = budget(Setup(model="llama3-8b", batch_size=1, seq_len=2048))
    assert llama3["logits"] == 3 * 261 * 128256 * 4
    assert budget(Setup(model="llama3-8b", batch_size=1, seq_len=522))["logits"] == 2 * 522 * 128256 * 4
    assert budget(Setup(model="llama3-8b", batch_size=1, seq_len=523))["logits"] == 3 * 261 * 128256 * 4
    Gemma2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16).save_pretrained(tmp_path)
    assert budget(Setup(model=str(tmp_path), batch_size=1, seq_len=2048))["logits"] == 3 * 2048 * 1000 * 4


def test_plan_takes_the_compute_dtype():
    fp32, bf16 = (budget(Setup(model="llama-7b", dtype=dtype)) for dtype in ("auto", "bf16"))
    assert bf16["other weights"] * 2 == fp32["other weights"] and bf16["frozen targets"] == fp32["frozen targets"]
    result = CliRunner().invoke(cli, ["plan", "--model", "llama-7b", "--gpu", "t4", "--dtype", "fp32"])
    assert result.exit_code == 0 and "compute fp32" in result.output, result.output


def test_plan_needs_only_config_json(tiny_model_dir, tmp_path):
    only_config = tmp_path / "config-only"
    only_config.mkdir()
    shutil.copy(tiny_model_dir / "config.json", only_config)
    result = CliRunner().invoke(cli, ["plan", "--model", str(only_config), "--rank", "4"])
    assert result.exit_code == 0, result.output
    assert "frozen targets" in result.output and "fits: yes" in result.output


def test_plan_for_a_t4_advises_what_fits():
    result = CliRunner().invoke(cli, ["plan", "--model", "llama3-8b", "--gpu", "t4", "--batch-size", "16",
                                      "--seq-len", "2048"])
    assert result.exit_code == 0, result.output
    assert "compute fp16" in result.output and "fits: no" in result.output
    assert result.output.strip().splitlines()[-1].endswith("- fits")
    a100 = CliRunner().invoke(cli, ["plan", "--model", "llama3-8b", "--gpu", "a100-40"])
    assert "compute bf16" in a100.output and "fits: yes" in a100.output


@pytest.mark.parametrize("args, message", [(["--gpu", "v100"], "Invalid value for '--gpu'"),
                                           (["--rank", "0"], "--rank must be positive"),
                                           (["--bits", "3"], "--bits 3 is not supported"),
                                           (["--model", "nowhere-7b"], "no such file or directory, and not an alias")])
def test_plan_bad_input(args, message):
    result = CliRunner().invoke(cli, ["plan", *args])
    assert result.exit_code == 2 and message in result.output, result.output


GRID = "edora:1x256,edora:8x512,lora:2x512,lora:8x256,loraxs:4x256,loraxs:4x512"  # six shapes up to 8 × 512


def test_plan_is_the_measured_peak_of_real_runs_within_15_percent_up_to_8_by_512(model_cache, tmp_path, monkeypatch):
    """SmolLM2-135M on this CPU, edora, lora and loraxs on six batch × seq shapes: a 1-step
    `qsvd finetune` and `qsvd plan`, each in a fresh process (benchmarks/plan_accuracy.py, whose
    full grid is every method on every shape); each run splits its model."""
    monkeypatch.setenv("QSVD_CACHE", str(model_cache))
    figures = last_json_line([BENCHMARKS / "plan_accuracy.py", "--points", GRID, "--steps", "1"], tmp_path)
    assert [f"{point['method']}:{point['shape']}" for point in figures["points"]] == GRID.split(",")
    assert figures["plan_error_max"] < 0.15, figures["points"]
