"""Every kind of file qsvd publishes goes through `files.publish` (and checkpoints through its
`move_into_place`): a rewrite that fails at its very last step, the rename into place (made to fail
here as a full disk fails a write), keeps the old file or directory whole, and leaves no temporary
beside it. One case a kind: runs, checkpoints, prepared models, exports, predictions, GGUF files."""

import errno
import json
import os
from pathlib import Path

import pytest

import qsvd
from qsvd.checkpoints import is_intact
from qsvd.errors import QSVDError
from qsvd.files import publish
from test_export_gguf import save_and_train, tiny

KINDS = ["run", "checkpoint", "prepared model", "peft export", "predictions", "gguf file"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny llama, a 2-step edora run of it, and one file of each kind that can be rewritten."""
    root = tmp_path_factory.mktemp("publish")
    run = save_and_train(root, *tiny("llama"), method="edora", bits=4, max_steps=2, lr=5e-2, batch_size=4)
    (root / "rows.jsonl").write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"})
                                             + "\n" for i in range(3)))
    qsvd.export(run, root / "run-peft")
    qsvd.export(run, root / "run.gguf", format="gguf")
    qsvd.evaluate(run, root / "rows.jsonl", task="nll", predictions=root / "predictions.jsonl")
    return root


def rewrite(kind: str, root: Path) -> None:
    """Write one file of `kind` again (or, for a checkpoint and a prepared model, a new one)."""
    finetune = dict(model=str(root / "model"), rank=4, seq_len=400, max_steps=2, lr=5e-2, batch_size=4)
    if kind == "run":
        qsvd.finetune(**finetune, output=str(root / "run"), overwrite=True)
    elif kind == "checkpoint":
        qsvd.finetune(**finetune, output=str(root / "run2"), save_steps=1)
    elif kind == "prepared model":
        qsvd.init(model=str(root / "model"), method="lora", rank=4)
    elif kind == "peft export":
        qsvd.export(root / "run", root / "run-peft", overwrite=True)
    elif kind == "predictions":
        qsvd.evaluate(root / "run", root / "rows.jsonl", task="nll", predictions=root / "predictions.jsonl")
    else:
        qsvd.export(root / "run", root / "run.gguf", format="gguf", overwrite=True)


def placed(kind: str, root: Path, destination: Path) -> bool:
    """Whether `destination` is where the rewrite of `kind` puts its new file in place."""
    if kind == "checkpoint":
        return destination == root / ".run2.partial" / "checkpoints" / "checkpoint-2"
    if kind == "prepared model":
        return destination.parent == root / "cache" / "prepared" and destination.name.startswith("lora-")
    return destination == root / {"run": "run", "peft export": "run-peft", "predictions": "predictions.jsonl",
                                   "gguf file": "run.gguf"}[kind]


def contents(folder: Path) -> dict[str, bytes]:
    """Every file below `folder`, but in a run's work dir (.NAME.partial, kept for --resume)."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and not path.relative_to(folder).parts[0].endswith(".partial")}


@pytest.mark.parametrize("kind", KINDS)
def test_a_rewrite_that_fails_as_it_is_put_in_place_keeps_the_old_and_no_temporary(kind, root, monkeypatch):
    monkeypatch.setenv("QSVD_CACHE", str(root / "cache"))
    before = contents(root)
    rename, tried = os.replace, []

    def replace(source, destination):  # the first rename into place fails; putting an old one back does not
        if placed(kind, root, Path(destination)) and not tried:
            tried.append(Path(destination))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(destination))
        rename(source, destination)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises((OSError, QSVDError), match="No space left on device"):
        rewrite(kind, root)
    assert len(tried) == 1, tried
    target, after = tried[0], contents(root)
    if kind == "checkpoint":  # the one before it is kept whole, for --resume
        checkpoints = root / ".run2.partial" / "checkpoints"
        assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-1"] and is_intact(checkpoints / "checkpoint-1")
    else:
        assert after == before, sorted(set(after.items()) ^ set(before.items()))[:3]
    assert not [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.") and p.suffix != ".partial"]


def test_a_directory_published_where_a_file_was_and_a_file_where_a_directory_was(tmp_path):
    """--overwrite of an --output that is a file (or the other way round) replaces it, and leaves nothing beside."""
    (tmp_path / "run").write_text("a file where a run goes")
    publish(tmp_path / "run", lambda tmp: (tmp / "adapter.safetensors").write_text("new"))
    (tmp_path / "model.gguf").mkdir()
    (tmp_path / "model.gguf" / "old").write_text("a directory where a file goes")
    publish(tmp_path / "model.gguf", lambda tmp: tmp.write_text("new"), directory=False)
    assert (tmp_path / "run" / "adapter.safetensors").read_text() == "new"
    assert (tmp_path / "model.gguf").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "run"]
