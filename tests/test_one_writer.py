"""A run directory, an export and a prepared model each have one writer: a second process that
would write a run being written is refused in one line naming the writer, and the running run
finishes untouched; two processes preparing one model (and converting one GGUF's config) both
succeed, the split done once."""

import os
import re
import subprocess
import sys
import time

from click.testing import CliRunner

from qsvd.cli import cli
from qsvd.files import one_writer
from conftest import tiny_model, tiny_run_args
from gguf_files import write_gguf

QSVD = [sys.executable, "-m", "qsvd"]


def test_a_run_being_written_is_refused_to_every_other_writer_and_finishes_untouched(tiny_model_dir, tmp_path):
    output = tmp_path / "run"
    args = ["finetune", *tiny_run_args(tiny_model_dir, output, "--max-steps", 100, "--save-steps", 50)]
    first = subprocess.Popen(QSVD + args,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / ".run.partial").is_dir():  # it trains
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.05)
    for extra in ([], ["--overwrite"], ["--resume"]):
        second = CliRunner().invoke(cli, [*args, *extra])
        assert second.exit_code == 2, second.output
        assert re.search(rf"^error: --output {re.escape(str(output))} is being written now by process {first.pid} on "
                         r"\S+; wait for it to finish, or choose another --output$", second.output, re.M), second.output
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    assert (output / "adapter.safetensors").is_file() and not (tmp_path / ".run.partial").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]  # the lock went with its writer

    with one_writer(tmp_path / "peft", wait=False):  # another exporter, here this process
        export = CliRunner().invoke(cli, ["export", str(output), "--output", str(tmp_path / "peft")])
    assert export.exit_code == 2 and f"--output {tmp_path / 'peft'} is being written now by process {os.getpid()}" \
        in export.output, export.output
    assert CliRunner().invoke(cli, ["export", str(output), "--output", str(tmp_path / "peft")]).exit_code == 0


def test_two_first_runs_at_once_convert_and_split_once_and_both_succeed(tmp_path, isolated_cache):
    """Two `qsvd init`s of a GGUF never seen: one converts its config and splits; the other waits,
    then reuses both."""
    gguf = write_gguf(tiny_model(), tmp_path / "tiny.gguf")
    command = QSVD + ["init", "--model", str(gguf), "--method", "edora", "--rank", "4"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    text = "\n".join(outputs)
    assert text.count("(once) ...") == 1 and text.count("prepared model saved to") == 1, text
    assert "already prepared" in text
    prepared = isolated_cache / "prepared"
    assert len(list(prepared.iterdir())) == 1 and not list(prepared.glob(".*"))
