"""Data-parallel training through accelerate: two gloo processes on CPU train what one process
trains on the same global batch, and only the main process builds the prepared model."""

import json
import os
import subprocess
import sys
import textwrap
from itertools import chain

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from qsvd import loss
from qsvd.cli import cli
from qsvd.launch import without_option
from qsvd.load import resolve_model
from qsvd.methods import METHODS
from qsvd.prepared import obtain
from qsvd.split import make_spec


def run_args(model_dir, output, batch_size, method):
    return ["finetune", "--model", str(model_dir), "--output", str(output), "--method", method, "--bits", "4",
            "--rank", "4", "--batch-size", str(batch_size), "--max-steps", "4", "--save-steps", "2", "--lr", "3e-2"]


def spy_on_prepared(directory):
    """A sitecustomize that makes every process say when it builds or loads the prepared model."""
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(textwrap.dedent("""
        import os, sys
        import qsvd.prepared as prepared

        def spy(name):
            original = getattr(prepared, name)
            def told(*args, **kwargs):
                print(f"{name} on process {os.environ.get('RANK')}", file=sys.stderr, flush=True)
                return original(*args, **kwargs)
            setattr(prepared, name, told)

        spy("build")
        spy("load_prepared")
    """))


@pytest.mark.parametrize("method", ["edora", "lora"])  # lora: a random init, which every process must share
def test_two_processes_train_what_one_process_trains_on_the_same_global_batch(method, tiny_model_dir, tmp_path,
                                                                               monkeypatch):
    """Under DDP the model's own loss (full logits) is taken; one process takes qsvd's, here in
    chunks of 16 tokens: the same losses and adapter."""
    args = {size: run_args(tiny_model_dir, tmp_path / run, size, method) for run, size in (("one", 4), ("two", 2))}
    spy_on_prepared(tmp_path / "spy")
    env = os.environ | {"PYTHONPATH": str(tmp_path / "spy")}
    two = subprocess.run([sys.executable, "-m", "qsvd", *args[2], "--num-processes", "2"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    told = {line for line in two.stderr.splitlines() if " on process " in line}
    assert told == {"build on process 0", "load_prepared on process 1"}

    monkeypatch.setattr(loss, "LOGIT_CHUNK_BYTES", 16 * 4 * 128)
    one = CliRunner().invoke(cli, args[4])
    assert one.exit_code == 0, one.output

    record = json.loads((tmp_path / "two" / "qsvd_config.json").read_text())
    assert record["processes"] == 2 and record["config"]["batch_size"] == 2
    adapters = [load_file(tmp_path / run / "adapter.safetensors") for run in ("one", "two")]
    assert adapters[0].keys() == adapters[1].keys()
    assert max((adapters[0][k] - adapters[1][k]).abs().max().item() for k in adapters[0]) < 1e-5
    logs = [[json.loads(line) for line in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
            for run in ("one", "two")]
    losses = [[entry["loss"] for entry in log if "loss" in entry] for log in logs]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], abs=1e-5) and losses[0][-1] < losses[0][0]
    assert not (tmp_path / ".two.partial").exists()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_layer_built_and_a_layer_loaded_list_their_tensors_in_one_order(method, tiny_model_dir):
    """DDP pairs parameters and buffers across processes by position: the main process builds the
    prepared model and the others load it, so both must list them alike."""
    files = resolve_model(str(tiny_model_dir))
    orders = []
    for _ in range(2):  # built, then loaded
        model, _ = obtain(files, make_spec(method, 4, None, 4), progress=False)
        orders.append([name for name, _ in chain(model.named_parameters(), model.named_buffers())])
    assert orders[0] == orders[1]


def test_num_processes_is_taken_out_of_the_relaunched_command():
    argv = ["finetune", "--num-processes", "2", "--rank", "4", "--num-processes=3", "--output", "x"]
    assert without_option(argv, "--num-processes") == ["finetune", "--rank", "4", "--output", "x"]


def test_more_processes_than_gpus_is_refused(monkeypatch, tmp_path, tiny_model_dir):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    result = CliRunner().invoke(cli, run_args(tiny_model_dir, tmp_path / "run", 2, "edora") + ["--num-processes", "2"])
    assert result.exit_code == 2 and "--num-processes 2: this machine has 1 GPU(s)" in result.output


def test_fsdp_is_refused_with_the_reason(monkeypatch, tmp_path, tiny_model_dir):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets for an FSDP config
    result = CliRunner().invoke(cli, run_args(tiny_model_dir, tmp_path / "run", 2, "edora"))
    assert result.exit_code == 2 and "FSDP is not supported yet" in result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / ".run.partial").exists()
