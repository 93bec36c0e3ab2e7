"""`qsvd finetune` end to end on a tiny model, and a clear one-line error for every bad flag."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import qsvd
from qsvd.cli import cli
from qsvd.methods import METHODS

# Tiny random models learn the arithmetic set's character statistics fast at these rates.
TEST_LR = {"lora": 3e-3, "dora": 3e-3, "pissa": 3e-3, "milora": 3e-3, "loraxs": 2e-1, "edora": 3e-2, "lorasb": 1e-1}


def run(*args):
    return CliRunner().invoke(cli, ["finetune", *map(str, args)])


def tiny_args(model_dir, output, *extra):
    return ["--model", model_dir, "--output", output, "--rank", 8, "--seq-len", 400, "--batch-size", 8, *extra]


@pytest.mark.parametrize("method", list(METHODS))
def test_finetune_each_method_lowers_loss_and_writes_run(method, tiny_model_dir, tmp_path):
    output = tmp_path / "run"
    result = run(*tiny_args(tiny_model_dir, output, "--method", method, "--bits", 4, "--max-steps", 30,
                            "--lr", TEST_LR[method]))
    assert result.exit_code == 0, result.output
    assert "trainable params:" in result.output and "final loss:" in result.output
    losses = [json.loads(line)["loss"] for line in (output / "train_log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.05  # five times the step-to-step noise here
    record = json.loads((output / "qsvd_config.json").read_text())
    assert record["spec"]["method"] == method and record["spec"]["bits"] == 4
    assert record["config"]["lr"] == TEST_LR[method]
    tensors = load_file(output / "adapter.safetensors")
    assert set(record["targets"]) == {key.rsplit(".", 1)[0] for key in tensors}
    assert [p.name for p in output.parent.iterdir()] == ["run"]  # no staging directory left behind


def test_python_api_run_reloads_to_the_same_logits(tiny_model_dir, tmp_path):
    result = qsvd.finetune(model=str(tiny_model_dir), method="edora", bits=4, rank=4, max_steps=5,
                           lr=3e-2, seq_len=400, output=str(tmp_path / "run"))
    reloaded, tokenizer = qsvd.load_run(tmp_path / "run", device="cpu")
    ids = tokenizer("Ava has 3 apples.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, result.model.eval()(ids).logits)
    assert result.trainable_params == sum(p.numel() for p in reloaded.parameters() if p.requires_grad)
    record = json.loads((tmp_path / "run" / "qsvd_config.json").read_text())
    assert 0 < result.setup_seconds == record["setup_seconds"] < result.seconds  # setup ends at the first step


def test_dry_run_resolves_config_file_and_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("method: milora\nrank: 32\nlr: 1.0e-4\n")
    result = run("--config", config, "--rank", 8, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "method: milora" in result.output and "rank: 8" in result.output and "lr: 0.0001" in result.output
    assert "alpha: 8.0" in result.output
    assert not (tmp_path / "runs").exists()


def test_method_default_lr_differs_for_core_methods():
    lora = run("--method", "lora", "--dry-run").output
    edora = run("--method", "edora", "--dry-run").output
    assert "lr: 0.0002" in lora and "lr: 0.002" in edora


def test_lorasb_grad_samples_follow_the_task_type():
    assert "grad_samples: 50" in run("--method", "lorasb", "--dry-run").output
    assert "grad_samples: 170" in run("--method", "lorasb", "--task-type", "commonsense", "--dry-run").output
    assert "grad_samples: 8" in run("--method", "lorasb", "--task-type", "commonsense", "--grad-samples", 8,
                                    "--dry-run").output


def test_lorasb_budget_splits_the_estimate_into_groups(tiny_model_dir, tmp_path):
    """A 40 KB budget holds two or three of the tiny model's 16-32 KB gradients at a time."""
    result = run(*tiny_args(tiny_model_dir, tmp_path / "run", "--method", "lorasb", "--max-steps", 1,
                            "--grad-samples", 8, "--grad-mem-budget", "40KB"))
    assert result.exit_code == 0, result.output
    groups = re.search(r"lorasb: gradients of 14 layers in (\d+) groups within 0.03906 MB", result.output)
    assert groups and int(groups[1]) >= 7, result.output


def test_existing_output_is_kept_without_overwrite(tiny_model_dir, tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    (output / "keep.txt").write_text("earlier work")
    result = run(*tiny_args(tiny_model_dir, output, "--max-steps", 1))
    assert result.exit_code == 2
    assert "--overwrite" in result.output
    assert (output / "keep.txt").read_text() == "earlier work"


BAD_FLAGS = [
    (["--rank", 0], "--rank must be a positive integer"),
    (["--rank", 65], "--rank 65 is larger than min(out, in) = 64 of layer model.layers.0.self_attn.q_proj"),
    (["--alpha", -1], "--alpha must be positive"),
    (["--bits", 3], "--bits 3 is not supported"),
    (["--lr", 0], "--lr must be positive"),
    (["--batch-size", 0], "--batch-size must be positive"),
    (["--max-steps", -2], "--max-steps must be positive"),
    (["--seq-len", 5], "no row of the built-in dataset fits in --seq-len 5"),
    (["--targets", "attn_qkv"], "--targets attn_qkv matches no linear layer; this model has: down_proj,gate_proj"),
    (["--method", "lorasb", "--alpha", 16], "lorasb fixes the scale s = 1"),
    (["--method", "lora", "--refine-iters", 2], "--refine-iters takes a count ≥ 0 and applies to pissa only"),
    (["--method", "milora", "--svd-niter", 2], "--svd-niter takes a count ≥ 0 and applies to the methods"),
    (["--method", "lorasb", "--grad-mem-budget", "lots"], "--grad-mem-budget must be a positive size such as 512MB"),
    (["--method", "lorasb", "--grad-mem-budget", "0GB"], "--grad-mem-budget must be a positive size"),
    (["--method", "lorasb", "--grad-samples", 0], "--grad-samples must be positive"),
    (["--method", "lorasb", "--init-lr", 0], "--init-lr must be positive and finite, got 0.0"),
    (["--method", "lorasb", "--init-lr", "nan"], "--init-lr must be positive and finite, got nan"),
    (["--lr", "inf"], "--lr must be positive and finite, got inf"),
]


@pytest.mark.parametrize("extra,message", BAD_FLAGS)
def test_bad_flag_is_one_clear_line(extra, message, tiny_model_dir, tmp_path):
    result = run(*tiny_args(tiny_model_dir, tmp_path / "run", "--max-steps", 1, *extra))
    assert result.exit_code == 2
    if message:
        last_line = result.output.strip().splitlines()[-1]
        assert last_line.startswith("error: ") and message in last_line
        assert result.output.count("error") == 1 and "Traceback" not in result.output
    assert os.listdir(tmp_path) == []  # no run, no work dir, no temp dir


def test_bad_inputs_name_the_problem(tmp_path):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("hello")
    (tmp_path / "empty").mkdir()
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{ not json")
    odd_fields = tmp_path / "odd.jsonl"
    odd_fields.write_text('{"prompt": "a", "reply": "b"}\n')
    config = tmp_path / "typo.yaml"
    config.write_text("methd: lora\n")
    cases = [
        (["--model", tmp_path / "nowhere"], "no such file or directory, and not an alias"),
        (["--model", tmp_path / "empty"], "holds no config.json: it is not a transformers model directory"),
        (["--model", not_gguf], "is not a GGUF file"),
        (["--data", tmp_path / "missing.json"], "no such file"),
        (["--data", bad_json], "is not a json or jsonl file"),
        (["--data", odd_fields], "its fields are: prompt, reply"),
        (["--config", config], "unknown keys: methd"),
    ]
    for args, message in cases:
        result = run(*args, "--output", tmp_path / "out")
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
    assert not (tmp_path / "out").exists()


def test_console_script_exits_2_on_bad_method():
    result = subprocess.run([sys.executable, "-m", "qsvd", "finetune", "--method", "qlora"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "'qlora' is not one of" in result.stderr


@pytest.mark.parametrize("config", sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")))
def test_shipped_configs_resolve(config):
    result = run("--config", config, "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"method: {config.stem}" in result.output or config.stem == "smollm2-135m"


def test_init_prepares_once_and_finetune_reuses_it(tiny_model_dir, tmp_path):
    init = ["init", "--model", tiny_model_dir, "--method", "pissa", "--rank", 8, "--refine-iters", 1]
    first = CliRunner().invoke(cli, list(map(str, init)))
    assert first.exit_code == 0, first.output
    assert "prepared model saved to" in first.output
    assert "× plain QLoRA's" in first.output  # the refinement's report
    again = CliRunner().invoke(cli, list(map(str, init)))
    assert again.exit_code == 0 and "already prepared" in again.output
    result = run(*tiny_args(tiny_model_dir, tmp_path / "run", "--method", "pissa", "--refine-iters", 1,
                            "--max-steps", 1))
    assert result.exit_code == 0, result.output
    assert "reusing the prepared model" in result.output
    record = json.loads((tmp_path / "run" / "qsvd_config.json").read_text())
    assert record["prepared_model"] in first.output


def test_init_rejects_bad_flags_before_any_work(tiny_model_dir):
    result = CliRunner().invoke(cli, ["init", "--model", str(tiny_model_dir), "--rank", "65"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error: --rank 65 is larger than")
