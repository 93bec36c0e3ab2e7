"""Hub ids: models resolved offline from a real huggingface_hub cache on disk, built here in the
library's own layout (blobs, snapshots of links, refs), and the hub's failures told in one line."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

import qsvd
from qsvd.errors import QSVDError
from qsvd.load import hub_errors, resolve_model

REPO = "tiny-org/tiny-llama"


def cache_repo(cache: Path, repo_id: str, files: list[Path], revision: str = "main") -> str:
    """Put `files` into `cache` as huggingface_hub stores a download: each file's bytes once under
    blobs/, a snapshot of links per commit, and refs/<revision> naming the commit."""
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for file in files:
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / file.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit


@pytest.fixture
def hub_cache(tmp_path, tiny_model_dir, monkeypatch):
    """An offline hub cache holding the tiny Llama at main and, config only, at a tag v1."""
    cache = tmp_path / "hub"
    cache_repo(cache, REPO, sorted(tiny_model_dir.iterdir()))
    cache_repo(cache, REPO, [tiny_model_dir / "config.json"], revision="v1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_the_cache_is_in_huggingface_hubs_own_layout(hub_cache):
    (repo,) = huggingface_hub.scan_cache_dir(hub_cache).repos
    assert repo.repo_id == REPO and {ref for revision in repo.revisions for ref in revision.refs} == {"main", "v1"}


def test_hub_id_resolves_offline_from_the_cache(hub_cache):
    files = resolve_model(REPO)
    assert files.repo_id == REPO and files.config_dir.parent.name == "snapshots"
    assert [path.name for path in files.weights] == ["model.safetensors"]
    with pytest.raises(QSVDError, match=r"--model tiny-org/tiny-llama holds config.json but no \*.safetensors"):
        resolve_model(REPO, revision="v1")


def test_plan_fetches_only_the_config(hub_cache):
    """At v1 the cache holds config.json alone: enough for a plan."""
    parts = qsvd.plan(model=REPO, revision="v1", method="lora", rank=4, seq_len=64, batch_size=1)
    assert parts["frozen targets"] > 0


@pytest.mark.parametrize("spec,revision,message", [
    ("tiny-org/absent", None, "tiny-org/absent is not (completely) in the hub cache"),
    (REPO, "v2", "tiny-org/tiny-llama@v2 is not (completely) in the hub cache"),
    ("smollm2-135m", "v1", "--revision applies to hub models"),
    ("not a/hub id", None, "not an alias (smollm2-135m"),
])
def test_hub_problems_are_one_line(spec, revision, message, hub_cache):
    with pytest.raises(QSVDError) as error:
        resolve_model(spec, revision)
    assert message in str(error.value)


def response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", f"https://huggingface.co/{REPO}"))


@pytest.mark.parametrize("error,message", [
    (GatedRepoError("gated", response=response(403)), f"{REPO} is gated: accept its licence at "
                                                      f"https://huggingface.co/{REPO}, then log in"),
    (RepositoryNotFoundError("404", response=response(404)), "no such model on the hub, or it is private; check the name"),
    (RevisionNotFoundError("404", response=response(404)), "--revision v9: tiny-org/tiny-llama has no such branch"),
    (ConnectionError("no route to host"), "could not download tiny-org/tiny-llama@v9 from the hub"),
])
def test_hub_failures_say_what_to_do(error, message):
    """huggingface_hub's own exceptions, as the hub raises them online, each told as what to do."""
    with pytest.raises(QSVDError) as told:
        with hub_errors(REPO, "v9"):
            raise error
    assert message in str(told.value)


def test_finetune_a_hub_id_offline_from_the_command_line(hub_cache, tmp_path):
    """The user's path, in a fresh process: HF_HUB_OFFLINE and HF_HUB_CACHE as a user sets them."""
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)}
    run = subprocess.run([sys.executable, "-m", "qsvd", "finetune", "--model", REPO, "--method", "lora", "--rank", "4",
                          "--max-steps", "1", "--seq-len", "400", "--output", str(tmp_path / "run")],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    record = json.loads((tmp_path / "run" / "qsvd_config.json").read_text())
    assert record["config"]["model"] == REPO
    for notice in ("kernels-community", "Paged optimizers"):  # bitsandbytes' CPU notices are kept out
        assert notice not in run.stderr + run.stdout

    # export's base and eval's plain model come from the same cache
    peft = qsvd.export(tmp_path / "run", tmp_path / "peft")
    assert json.loads((peft / "adapter_config.json").read_text())["base_model_name_or_path"] == REPO
    assert f"AutoModelForCausalLM.from_pretrained('{REPO}')" in (peft / "README.md").read_text()
    data = tmp_path / "dev.jsonl"
    data.write_text('{"text": "Ava has 3 apples and Bob has 12."}\n')
    result = qsvd.evaluate(REPO, data, task="ppl", predictions=tmp_path / "p.jsonl")
    assert result.summary()["perplexity"] > 1
