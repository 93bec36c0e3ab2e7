"""`qsvd plan`: its parts equal what a prepared model really holds, its total is the measured peak
of real runs within 15%; it needs no weights; it advises."""

import json
import os
import random
import re
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner
from transformers import Gemma2Config

from qsvd.cli import cli
from qsvd.load import load_tokenizer, resolve_model
from qsvd.plan import Setup, budget
from qsvd.split import adapter_layers, prepare

from conftest import tiny_model


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
    """Llama 3 at 2048 tokens: 261 tokens' logits (128 MiB in fp32) and their gradient, not 2048;
    Gemma 2 soft-caps its logits, so its loss takes them whole."""
    llama3 = budget(Setup(model="llama3-8b", batch_size=1, seq_len=2048))
    assert llama3["logits"] == 2 * 261 * 128256 * 4
    assert budget(Setup(model="llama3-8b", batch_size=1, seq_len=200))["logits"] == 2 * 200 * 128256 * 4
    Gemma2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16).save_pretrained(tmp_path)
    assert budget(Setup(model=str(tmp_path), batch_size=1, seq_len=2048))["logits"] == 2 * 2048 * 1000 * 4


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


def full_rows(tokenizer, seq_len: int, path, rows: int = 16) -> None:
    """Rows whose answers fill --seq-len, as the plan assumes: every token supervised."""
    words = "alpha beta gamma delta river stone cloud seven eleven market garden window yellow quiet".split()
    rng = random.Random(0)
    with open(path, "w") as file:
        for i in range(rows):
            ids = tokenizer(" ".join(rng.choice(words) for _ in range(seq_len)), add_special_tokens=False)["input_ids"]
            row = {"instruction": f"Write word list {i}.", "output": tokenizer.decode(ids[:seq_len - 40])}
            file.write(json.dumps(row) + "\n")


@pytest.mark.parametrize("method, batch_size, seq_len", [
    ("edora", 2, 128), ("loraxs", 1, 512), pytest.param("milora", 2, 256, marks=pytest.mark.slow)])
def test_plan_is_the_measured_peak_of_a_real_run_within_15_percent(method, batch_size, seq_len, model_cache, tmp_path,
                                                                   monkeypatch):
    """SmolLM2-135M on this CPU: a 2-step run and the plan, each in a fresh process; the run
    prepares its model afresh (its own cache, sharing only the converted model)."""
    monkeypatch.setenv("QSVD_CACHE", str(model_cache))
    tokenizer = load_tokenizer(resolve_model("smollm2-135m"))  # converts the GGUF once, outside the measured run
    full_rows(tokenizer, seq_len, tmp_path / "rows.jsonl")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(model_cache / "models")
    # a clean environment: nothing an earlier test or library left in os.environ reaches the measured run
    env = {key: os.environ[key] for key in ("PATH", "HOME", "TMPDIR", "LANG") if key in os.environ}
    env["QSVD_CACHE"] = str(cache)
    sizes = ["--method", method, "--batch-size", str(batch_size), "--seq-len", str(seq_len)]
    subprocess.run([sys.executable, "-m", "qsvd", "finetune", *sizes, "--data", str(tmp_path / "rows.jsonl"),
                    "--max-steps", "2", "--output", str(tmp_path / "run")], env=env, check=True, capture_output=True)
    measured = json.loads((tmp_path / "run" / "qsvd_config.json").read_text())["peak_memory_mb"]
    plan = subprocess.run([sys.executable, "-m", "qsvd", "plan", *sizes], env=env, check=True, capture_output=True,
                          text=True)
    planned = float(re.search(r"peak\s+([\d,]+) MiB", plan.stderr).group(1).replace(",", ""))
    assert abs(planned - measured) / measured < 0.15, (planned, measured, plan.stderr)
