"""`qsvd export --push-to-hub`: the Hub cannot be reached from here, so these tests stop at
huggingface_hub's API boundary (HfApi.create_repo, create_branch, upload_folder) and check what
would be uploaded; its failures are one line, after the local export is complete and kept."""

import hashlib
from pathlib import Path

import httpx2
import huggingface_hub
import huggingface_hub.constants as huggingface_hub_constants
import pytest
import yaml
from click.testing import CliRunner
from huggingface_hub.errors import HfHubHTTPError

import qsvd
from qsvd.cli import cli

from test_export_gguf import save_and_train, tiny

REPO = "someone/tiny-edora"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-step edora run on a tiny Qwen2 (whose tokenizer GGUF can hold)."""
    return save_and_train(tmp_path_factory.mktemp("push"), *tiny("qwen2"), method="edora", bits=4, max_steps=1,
                          batch_size=4)


class FakeHub:
    """HfApi's three calls, recorded: the repo, its options, and every file of the folder as uploaded."""

    def __init__(self, monkeypatch, token: str | None = "hf_test", refuse: int | None = None):
        self.calls, self.uploaded = [], {}
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", self.create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", self.create_branch)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", self.upload_folder)
        self.refuse = refuse

    def create_repo(self, repo_id, **options):
        self.calls.append(("create_repo", repo_id, options))
        if self.refuse:
            request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
            raise HfHubHTTPError("403 Forbidden: you don't have the rights", response=httpx2.Response(self.refuse, request=request))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **options):
        self.calls.append(("create_branch", repo_id, options))

    def upload_folder(self, *, repo_id, folder_path, **options):
        self.calls.append(("upload_folder", repo_id, options))
        folder = Path(folder_path)
        self.uploaded = {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
                         if path.is_file()}

    def card(self) -> dict:
        text = self.uploaded["README.md"].decode()
        return yaml.safe_load(text.split("---\n")[1])


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("format, library, names", [
    ("peft", "peft", {"README.md", "adapter_config.json", "adapter_model.safetensors"}),
    ("merged", "transformers", {"README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}),
    ("gguf", "gguf", {"README.md", "export.gguf", "export.Modelfile"}),
])
def test_push_uploads_the_export_with_its_card(run, tmp_path, monkeypatch, format, library, names):
    hub = FakeHub(monkeypatch)
    output = tmp_path / ("export.gguf" if format == "gguf" else "export")
    qsvd.export(run, output, format=format, gguf_type="q8_0", push_to_hub=REPO)
    assert [call[:2] for call in hub.calls] == [("create_repo", REPO), ("upload_folder", REPO)]
    assert hub.calls[0][2] == {"private": False, "repo_type": "model", "exist_ok": True}
    assert hub.calls[1][2]["repo_type"] == "model" and hub.calls[1][2]["revision"] is None
    assert names <= set(hub.uploaded), sorted(hub.uploaded)
    local = ({path.name: path.read_bytes() for path in (output, output.with_suffix(".Modelfile"))} |
             {"README.md": output.with_suffix(".md").read_bytes()} if format == "gguf" else
             {str(path.relative_to(output)): path.read_bytes() for path in output.rglob("*") if path.is_file()})
    assert {name: digest(data) for name, data in hub.uploaded.items()} == {name: digest(data) for name, data in local.items()}
    card = hub.card()
    assert card["base_model"] == str(run.parent / "model") and card["library_name"] == library
    assert card["tags"][:2] == ["qsvd", "edora"] and (format != "gguf" or card["tags"][2:] == ["gguf", "q8_0"])
    if format == "gguf":
        assert hub.uploaded["export.Modelfile"].decode().startswith("# edora fine-tune of ")
        assert "q8_0 weights" in hub.uploaded["export.Modelfile"].decode().splitlines()[0]


def test_push_to_a_branch_of_a_private_repo(run, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    qsvd.export(run, tmp_path / "peft", push_to_hub=REPO, private=True, revision="v2")
    assert [call[0] for call in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[0][2]["private"] is True
    assert hub.calls[1][2] == {"branch": "v2", "repo_type": "model", "exist_ok": True}
    assert hub.calls[2][2]["revision"] == "v2"


def export_cli(*args):
    return CliRunner().invoke(cli, ["export", *map(str, args)])


@pytest.mark.parametrize("case, message", [
    ("no token", "no Hugging Face token; log in with `hf auth login`"),
    ("someone else's repo", "the Hub refused to write to someone/tiny-edora (HTTP 403): the repo belongs to an account"),
    ("offline", "HF_HUB_OFFLINE is set"),
])
def test_a_failed_push_is_one_line_and_keeps_the_export(run, tmp_path, monkeypatch, case, message):
    if case == "offline":  # the real huggingface_hub, offline
        monkeypatch.setenv("HF_TOKEN", "hf_test")
        monkeypatch.setattr(huggingface_hub_constants, "HF_HUB_OFFLINE", True)
    else:
        FakeHub(monkeypatch, token=None if case == "no token" else "hf_test", refuse=403 if "else" in case else None)
    result = export_cli(run, "--output", tmp_path / "peft", "--push-to-hub", REPO)
    assert result.exit_code == 2, result.output
    assert result.output.count("error:") == 1 and message in result.output, result.output
    assert f"the export is complete and kept at {tmp_path / 'peft'}" in result.output
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file() and (tmp_path / "peft" / "README.md").is_file()


@pytest.mark.parametrize("args, message", [
    (["--push-to-hub", "no-slash"], "is not a Hub repo id"),
    (["--push-to-hub", "a/b/c"], "is not a Hub repo id"),
    (["--push-to-hub", "org/na me"], "is not a Hub repo id"),
    (["--private"], "--private and --revision are for --push-to-hub"),
    (["--revision", "v2"], "--private and --revision are for --push-to-hub"),
])
def test_bad_push_options_are_refused_before_anything_is_written(run, tmp_path, monkeypatch, args, message):
    hub = FakeHub(monkeypatch)
    result = export_cli(run, "--output", tmp_path / "peft", *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "peft").exists() and not hub.calls
