"""Paths that cannot be written: a parent that is a file, a folder this user may not write in, a
disk that fills up while a checkpoint or an export is written. Each is one line naming the path
and the reason, exit 2, nothing half-written left; a full disk keeps the last checkpoint, and
--resume continues from it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from qsvd.checkpoints import is_intact, newest_intact
from qsvd.cli import cli
from conftest import tiny_run_args

QSVD = [sys.executable, "-m", "qsvd"]


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error: ")]


def test_an_output_under_a_file_is_refused_in_one_line(tiny_model_dir, tmp_path):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file where a folder would go")
    result = CliRunner().invoke(cli, ["finetune", *tiny_run_args(tiny_model_dir, blocker / "runs" / "edora", "--max-steps", 1)])
    assert result.exit_code == 2
    assert error_lines(result.output) == [f"error: --output {blocker / 'runs' / 'edora'}: {blocker} is a file, not a folder"]
    assert CliRunner().invoke(cli, ["finetune", *tiny_run_args(tiny_model_dir, tmp_path / "run", "--max-steps", 1)]).exit_code == 0
    for args in (["--output", str(blocker / "peft")], ["--format", "gguf", "--output", str(blocker / "model.gguf")]):
        result = CliRunner().invoke(cli, ["export", str(tmp_path / "run"), *args])
        assert result.exit_code == 2 and f"{blocker} is a file, not a folder" in result.output, result.output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt", "run"]


@pytest.mark.parametrize("cause", ["permission", "read-only"])
def test_an_output_in_a_folder_that_cannot_be_written_is_refused(cause, tiny_model_dir, tmp_path):
    """A folder without write permission (tried as a user other than root, whom permissions do not
    bind) or on a read-only filesystem (a notebook's input folder; tried where mounting is allowed)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if cause == "permission":
        if os.geteuid() == 0:
            pytest.skip("runs as root, whom folder permissions do not bind: the read-only case stands in")
        locked.chmod(0o555)
        reason = "this user may not write in it"
    else:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(locked)],
                          capture_output=True).returncode != 0:
            pytest.skip("cannot mount a read-only filesystem here (not root?)")
        reason = "it is on a read-only filesystem"
    try:
        result = CliRunner().invoke(cli, ["finetune", *tiny_run_args(tiny_model_dir, locked / "run", "--max-steps", 1)])
        assert result.exit_code == 2
        assert error_lines(result.output) == [f"error: --output {locked / 'run'}: cannot write in {locked}: {reason}"]
        assert list(locked.iterdir()) == []
    finally:
        if cause == "read-only":
            subprocess.run(["umount", str(locked)], check=True)
        locked.chmod(0o755)


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB filesystem of its own (tmpfs; needs the right to mount, which root has here)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(disk)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small filesystem here (not root?): the full disk is not tried")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def fill(disk: Path) -> Path:
    """Fill `disk` to the last byte with one file."""
    ballast = disk / "ballast"
    with open(ballast, "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    return ballast


def test_a_full_disk_keeps_the_last_checkpoint_and_resume_continues(tiny_model_dir, small_disk):
    """The disk fills while training: the next checkpoint fails, the last one stays intact, one line
    says so with the command to go on; with space again --resume finishes. An export into the full
    disk leaves nothing behind."""
    args = tiny_run_args(tiny_model_dir, small_disk / "run", "--max-steps", 60, "--save-steps", 2)
    process = subprocess.Popen(QSVD + ["finetune", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = small_disk / ".run.partial" / "checkpoints"
    while not (checkpoints.is_dir() and any(checkpoints.iterdir())):
        assert process.poll() is None, process.communicate()[1][-2000:]
    ballast = fill(small_disk)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 2, stderr[-2000:]
    [line] = error_lines(stderr)
    newest = newest_intact(checkpoints)
    assert line.startswith("error: the disk is full: ") and "No space left on device" in line
    assert f"the last good checkpoint is step {newest.name.rsplit('-', 1)[1]}" in line and "--resume" in line
    assert is_intact(newest)

    ballast.unlink()
    resumed = subprocess.run(QSVD + ["finetune", *args, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (small_disk / "run" / "adapter.safetensors").is_file() and not (small_disk / ".run.partial").exists()

    ballast = fill(small_disk)
    export = subprocess.run(QSVD + ["export", str(small_disk / "run"), "--format", "merged", "--output",
                                    str(small_disk / "merged")], capture_output=True, text=True, timeout=300)
    assert export.returncode == 2 and len(error_lines(export.stderr)) == 1, export.stderr[-2000:]
    assert error_lines(export.stderr)[0].startswith("error: the disk is full: ")
    assert sorted(path.name for path in small_disk.iterdir()) == ["ballast", "run"]
