"""Ctrl-C, a notebook's stop button and a preempted job (SIGINT, SIGTERM), sent to a real `qsvd
finetune` mid-step, mid-checkpoint and mid-split: one line with the step reached, the checkpoint
kept and the command that continues, exit 130 or 143, no traceback, nothing half-written; the
printed command then ends bit-identical to an uninterrupted run."""

import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from qsvd.checkpoints import newest_intact
from conftest import tiny_run_args

QSVD = [sys.executable, "-m", "qsvd"]
SIGNALS = [signal.SIGINT, signal.SIGTERM]


def run_args(model_dir, output):
    return ["finetune", *tiny_run_args(model_dir, output, "--max-steps", 24, "--save-steps", 4)]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    """The adapter an uninterrupted run ends with."""
    output = tmp_path_factory.mktemp("whole") / "run"
    subprocess.run(QSVD + run_args(tiny_model_dir, output), check=True, capture_output=True)
    return (output / "adapter.safetensors").read_bytes()


def self_signal(directory, module, function, signum, at_call):
    """A sitecustomize that makes this process send itself `signum` at the `at_call`-th call of
    module.function (then lets the call run)."""
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import importlib, os
        module = importlib.import_module({module!r})
        original, calls = getattr(module, {function!r}), [0]
        def signalled(*args, **kwargs):
            calls[0] += 1
            if calls[0] == {at_call}:
                os.kill(os.getpid(), {int(signum)})
            return original(*args, **kwargs)
        setattr(module, {function!r}, signalled)
    """))
    return os.environ | {"PYTHONPATH": str(directory)}


def told(result, signum) -> str:
    """The one error line of an interrupted command, which exited with 128 + the signal."""
    assert result.returncode == 128 + signum, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return line


def resume_with_the_printed_command(line: str, output, uninterrupted) -> None:
    command = shlex.split(line.split("continue with ", 1)[1])
    assert command[0] == "qsvd" and command[-1] == "--resume"
    resumed = subprocess.run(QSVD + command[1:], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (output / "adapter.safetensors").read_bytes() == uninterrupted


@pytest.mark.parametrize("signum", SIGNALS)
def test_a_signal_mid_step_saves_a_checkpoint_says_how_to_continue_and_resumes_bit_for_bit(
        signum, tiny_model_dir, tmp_path, uninterrupted):
    output = tmp_path / "run"
    process = subprocess.Popen(QSVD + run_args(tiny_model_dir, output), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    checkpoints = tmp_path / ".run.partial" / "checkpoints"
    deadline = time.monotonic() + 120
    while not (checkpoints / "checkpoint-4").is_dir():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.01)
    time.sleep(0.1)  # into the steps after it
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    line = told(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), signum)
    step = int(re.search(rf"interrupted by {signal.Signals(signum).name} at step (\d+);", line)[1])
    kept = int(re.search(rf"the checkpoint of step (\d+) is kept in {re.escape(str(checkpoints))}:", line)[1])
    assert 4 <= step < 24 and (kept == step or step - kept <= 2)  # saved unless the newest is ≤ --save-steps / 2 old
    assert newest_intact(checkpoints).name == f"checkpoint-{kept}"
    assert not output.exists()
    resume_with_the_printed_command(line, output, uninterrupted)


def test_a_signal_mid_checkpoint_lets_the_checkpoint_finish(tiny_model_dir, tmp_path, uninterrupted):
    """SIGTERM while checkpoint 4 is being sealed: it is sealed whole, training stops after the next
    step (no new checkpoint: 4 is recent enough), and the run resumes from 4."""
    env = self_signal(tmp_path / "spy", "qsvd.checkpoints", "seal", signal.SIGTERM, at_call=1)
    output = tmp_path / "run"
    result = subprocess.run(QSVD + run_args(tiny_model_dir, output), capture_output=True, text=True, env=env)
    line = told(result, signal.SIGTERM)
    assert "interrupted by SIGTERM at step 5;" in line and "the checkpoint of step 4 is kept" in line
    resume_with_the_printed_command(line, output, uninterrupted)


def test_a_process_started_with_sigint_ignored_keeps_ignoring_it(tiny_model_dir, tmp_path, uninterrupted):
    """A job a script put in the background ignores Ctrl-C: a SIGINT mid-checkpoint neither stops the
    run nor its checkpoint, and it ends as an uninterrupted run does."""
    env = self_signal(tmp_path / "spy", "qsvd.checkpoints", "seal", signal.SIGINT, at_call=1)
    output = tmp_path / "run"
    result = subprocess.run(QSVD + run_args(tiny_model_dir, output), capture_output=True, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert result.returncode == 0 and "interrupted" not in result.stderr, result.stderr[-3000:]
    assert (output / "adapter.safetensors").read_bytes() == uninterrupted


@pytest.mark.parametrize("signum", SIGNALS)
def test_a_signal_mid_split_leaves_nothing_half_written(signum, tiny_model_dir, tmp_path, isolated_cache):
    """The third layer's split is under way: no run, no work dir, no prepared model or temporary
    in the cache; the same command then runs from the start."""
    env = self_signal(tmp_path / "spy", "qsvd.quantize", "freeze", signum, at_call=3)
    output = tmp_path / "run"
    result = subprocess.run(QSVD + run_args(tiny_model_dir, output), capture_output=True, text=True, env=env)
    assert told(result, signum) == f"error: interrupted by {signal.Signals(signum).name}; nothing half-written was kept"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["spy"]
    prepared = isolated_cache / "prepared"
    assert not prepared.exists() or list(prepared.iterdir()) == []
    again = subprocess.run(QSVD + run_args(tiny_model_dir, output), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
