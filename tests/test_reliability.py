"""Reliability: killed runs resume exactly, a killed init never leaves a usable half-written cache,
runtime faults say what to do next, and nothing is loaded or run that the user did not ask for."""

import importlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import qsvd
from qsvd.files import MANIFEST
from qsvd.cli import cli
from qsvd.errors import QSVDError
from conftest import tiny_run_args

QSVD = [sys.executable, "-m", "qsvd"]


def finetune(*args):
    return CliRunner().invoke(cli, ["finetune", *map(str, args)])


def error_line(result) -> str:
    """The one `error: …` line of a failed command (Trainer's own log lines may follow it)."""
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    return errors[0]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the run ended before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def test_a_run_killed_at_a_random_step_resumes_to_the_same_adapter_bit_for_bit(tiny_model_dir, tmp_path):
    """SIGKILL after a random checkpoint; --resume then ends with the uninterrupted run's exact adapter."""
    args = list(map(str, tiny_run_args(tiny_model_dir, tmp_path / "whole")))
    subprocess.run(QSVD + ["finetune", *args], check=True, capture_output=True)

    step = random.choice([2, 4, 6, 8])
    args = list(map(str, tiny_run_args(tiny_model_dir, tmp_path / "killed")))
    process = subprocess.Popen(QSVD + ["finetune", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(tmp_path / ".killed.partial" / "checkpoints" / f"checkpoint-{step}", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed").exists()  # no half-written run

    refused = subprocess.run(QSVD + ["finetune", *args], capture_output=True, text=True)
    assert refused.returncode == 2 and "has an interrupted run" in refused.stderr and "--resume" in refused.stderr
    resumed = subprocess.run(QSVD + ["finetune", *args, "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    resumed_from = re.search(r"resuming from step (\d+)", resumed.stdout + resumed.stderr)
    assert resumed_from and int(resumed_from[1]) >= step
    assert (tmp_path / "killed" / "adapter.safetensors").read_bytes() == \
        (tmp_path / "whole" / "adapter.safetensors").read_bytes(), f"killed after step {step}"
    assert not (tmp_path / ".killed.partial").exists()  # the finished run replaced its work dir


def test_a_killed_init_leaves_no_usable_cache_and_the_next_run_rebuilds_it(tmp_path):
    """The prepared model of a model large enough to take a few seconds is killed mid-write."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import char_tokenizer

    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                 num_attention_heads=8, num_key_value_heads=8)).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    cache = tmp_path / "cache"
    env = os.environ | {"QSVD_CACHE": str(cache)}
    init = QSVD + ["init", "--model", str(model_dir), "--method", "milora", "--rank", "8"]
    process = subprocess.Popen(init, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    prepared = cache / "prepared"
    deadline = time.monotonic() + 120
    while not (prepared.is_dir() and any(p.name.startswith(".") for p in prepared.iterdir())):
        assert process.poll() is None and time.monotonic() < deadline, "init ended before writing"
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.5))
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert [p for p in prepared.iterdir() if not p.name.startswith(".")] == []  # only a temp dir

    again = subprocess.run(init, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "prepared model saved to" in again.stdout + again.stderr
    assert [p.name.startswith(".") for p in prepared.iterdir()] == [False]  # the killed run's temp dir is gone
    third = subprocess.run(init, env=env, capture_output=True, text=True)
    assert "already prepared" in third.stdout + third.stderr


def test_a_nan_loss_stops_keeps_the_last_checkpoint_and_says_how_to_resume(tiny_model_dir, tmp_path, monkeypatch):
    from qsvd import train

    calls = {"n": 0}
    real_loss = train.supervised_loss

    def diverging_loss(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(train, "supervised_loss", diverging_loss)
    message = error_line(finetune(*tiny_run_args(tiny_model_dir, tmp_path / "run")))
    assert message.startswith("error: training stopped: the loss became nan at step 5 (lr 0.03)")
    assert "the last good checkpoint is step 4" in message and "--resume" in message
    assert not (tmp_path / "run").exists()
    assert (tmp_path / ".run.partial" / "checkpoints" / "checkpoint-4" / MANIFEST).is_file()

    monkeypatch.setattr(train, "supervised_loss", real_loss)
    resumed = finetune(*tiny_run_args(tiny_model_dir, tmp_path / "run"), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from step 4" in resumed.output and (tmp_path / "run" / "adapter.safetensors").is_file()


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate")])
def test_running_out_of_memory_says_what_was_done_and_what_helps(error, tiny_model_dir, tmp_path, monkeypatch):
    recipe = importlib.import_module("qsvd.finetune")  # the module; qsvd.finetune is the function

    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(recipe, "train", out_of_memory)
    assert error_line(finetune(*tiny_run_args(tiny_model_dir, tmp_path / "run"))) == (
        "error: out of memory while training; to need less: start over (--overwrite) with --batch-size 2 "
        "--grad-accum 2 (the same effective batch), a shorter --seq-len, or --bits 4")
    assert sorted(os.listdir(tmp_path)) == []  # no checkpoint: nothing kept


def test_resume_checks_what_it_continues(tiny_model_dir, tmp_path, monkeypatch):
    result = finetune(*tiny_run_args(tiny_model_dir, tmp_path / "run"), "--resume")
    assert result.exit_code == 2 and "--resume: there is no interrupted run for --output" in result.output

    from qsvd import train
    real_loss = train.supervised_loss  # put back by name: undoing the monkeypatch would also unset QSVD_CACHE
    monkeypatch.setattr(train, "supervised_loss", lambda *args, **kwargs: torch.tensor(float("inf"), requires_grad=True))
    assert "the loss became inf at step 1" in error_line(
        finetune(*tiny_run_args(tiny_model_dir, tmp_path / "run", "--max-steps", 3, "--save-steps", 1)))
    partial = tmp_path / ".run.partial"
    assert not partial.exists()  # diverged before any checkpoint: nothing to resume, nothing kept
    monkeypatch.setattr(train, "supervised_loss", real_loss)

    args = tiny_run_args(tiny_model_dir, tmp_path / "run")
    calls = {"n": 0}

    def diverging_loss(*args, **kwargs):
        calls["n"] += 1
        return real_loss(*args, **kwargs) * (float("nan") if calls["n"] == 7 else 1.0)

    monkeypatch.setattr(train, "supervised_loss", diverging_loss)
    assert "step 7" in error_line(finetune(*args))
    monkeypatch.setattr(train, "supervised_loss", real_loss)
    changed = finetune(*tiny_run_args(tiny_model_dir, tmp_path / "run", "--rank", 8), "--resume")
    assert changed.exit_code == 2
    assert "the interrupted run used other options: rank 4 (now 8)" in changed.output

    # A damaged newest checkpoint is passed over for the one before it.
    newest = partial / "checkpoints" / "checkpoint-6"
    (newest / "adapter.safetensors").write_bytes(b"damaged")
    resumed = finetune(*args, "--resume")
    assert resumed.exit_code == 0 and "resuming from step 4" in resumed.output, resumed.output

    assert "(the run there finished; --overwrite trains it again)" in error_line(finetune(*args, "--resume"))
    again = finetune(*args)
    assert again.exit_code == 2 and "--overwrite" in again.output  # a finished run is kept too
    assert finetune(*args, "--overwrite").exit_code == 0


def test_a_resume_may_run_longer_and_save_at_another_interval(tiny_model_dir, tmp_path, monkeypatch):
    """The commonest reason to resume is more steps. A NaN at step 5 of 12 leaves checkpoint 4; a
    --max-steps that does not pass it is refused; --max-steps 16 --save-steps 4 trains on to step 16
    with the learning rates of a 16-step run from step 6 (Trainer lays its schedule over the new length)."""
    from qsvd import train

    real_loss, calls = train.supervised_loss, {"n": 0}

    def diverging_loss(*args, **kwargs):
        calls["n"] += 1
        return real_loss(*args, **kwargs) * (float("nan") if calls["n"] == 5 else 1.0)

    monkeypatch.setattr(train, "supervised_loss", diverging_loss)
    assert "step 5" in error_line(finetune(*tiny_run_args(tiny_model_dir, tmp_path / "run")))
    monkeypatch.setattr(train, "supervised_loss", real_loss)
    assert error_line(finetune(*tiny_run_args(tiny_model_dir, tmp_path / "run", "--max-steps", 4), "--resume")) == (
        "error: --resume: --max-steps 4 does not reach past the checkpoint's step 4; give a larger --max-steps, "
        "or start over with --overwrite")
    longer = finetune(*tiny_run_args(tiny_model_dir, tmp_path / "run", "--max-steps", 16, "--save-steps", 4), "--resume")
    assert longer.exit_code == 0 and "resuming from step 4" in longer.output, longer.output
    fresh = finetune(*tiny_run_args(tiny_model_dir, tmp_path / "fresh", "--max-steps", 16))
    assert fresh.exit_code == 0, fresh.output
    rates = [{entry["step"]: entry["learning_rate"] for entry in map(json.loads, (tmp_path / run / "train_log.jsonl")
                                                                      .read_text().splitlines()) if "loss" in entry}
             for run in ("run", "fresh")]
    # the first step after the checkpoint takes the learning rate the optimizer saved, then the new schedule's
    assert max(rates[0]) == 16 and all(rates[0][step] == rates[1][step] for step in range(6, 17))
    assert json.loads((tmp_path / "run" / "qsvd_config.json").read_text())["config"]["max_steps"] == 16


def test_a_longer_resume_by_epochs_must_pass_the_checkpoints_epoch(tmp_path):
    from qsvd.checkpoints import check_length_grows

    checkpoint = tmp_path / "checkpoint-8"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"epoch": 2.0, "global_step": 8}))
    saved = {"max_steps": None, "epochs": 2.5}
    check_length_grows(saved, {"max_steps": None, "epochs": 3.0}, checkpoint)
    with pytest.raises(QSVDError, match="--epochs 1.5 does not reach past the checkpoint's epoch 2;"):
        check_length_grows(saved, {"max_steps": None, "epochs": 1.5}, checkpoint)


def test_data_is_checked_before_the_model_is_fetched(tmp_path):
    """llama-7b would be downloaded (and fail here, offline): a bad --data is told first."""
    message = error_line(finetune("--model", "llama-7b", "--data", tmp_path / "typo.json", "--output", tmp_path / "o"))
    assert message == f"error: --data {tmp_path / 'typo.json'}: no such file"


def test_debug_shows_the_traceback(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(cli, ["--debug", "finetune", *map(str, tiny_run_args(tiny_model_dir, tmp_path / "r")),
                                      "--rank", "0"])
    assert isinstance(result.exception, QSVDError) and "--rank must be a positive integer" in str(result.exception)


def test_weights_load_only_from_safetensors_or_gguf(tiny_model_dir, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    torch.save({"model.embed_tokens.weight": torch.zeros(2)}, pickled / "pytorch_model.bin")
    result = finetune("--model", pickled, "--output", tmp_path / "out")
    assert result.exit_code == 2 and "has only pickle weights (pytorch_model.bin)" in result.output
    for source in Path(qsvd.__file__).parent.rglob("*.py"):
        text = source.read_text()
        assert "import pickle" not in text, source
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (source, call)


def test_remote_code_runs_only_when_asked(tiny_model_dir, tmp_path, monkeypatch):
    import transformers

    seen = []
    for auto in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        for name in ("from_pretrained", "from_config"):
            if hasattr(auto, name):
                original = getattr(auto, name)

                def spy(*args, _original=original, **kwargs):
                    seen.append(kwargs.get("trust_remote_code", False))
                    return _original(*args, **kwargs)

                monkeypatch.setattr(auto, name, spy)
    assert finetune(*tiny_run_args(tiny_model_dir, tmp_path / "run", "--max-steps", 1)).exit_code == 0
    assert seen and not any(seen)
    resolved = finetune("--trust-remote-code", "--dry-run").output
    assert "trust_remote_code: true" in resolved


def test_paths_from_configs_are_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text("data: $(touch pwned)\n")
    assert error_line(finetune("--config", config, "--output", tmp_path / "out")) == "error: --data $(touch pwned): no such file"
    config.write_text("model: \"`touch pwned2`\"\n")
    assert "no such file or directory, and not an alias" in error_line(finetune("--config", config))
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()
