"""`qsvd export --push-to-hub`: a finished export uploaded to a Hub model repo with huggingface_hub.

`create_repo` (an existing repo is kept), `create_branch` for --revision, then one `upload_folder`
commit: a peft or merged export's directory (its card is its README.md), or a GGUF file with its
Modelfile and its card as README.md. The export is complete on disk before anything is sent, and
every failure is one line that says so.
"""

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .console import console
from .errors import QSVDError, first_line

REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def check_repo_id(repo_id: str) -> None:
    """ORG/NAME, checked before any export is written."""
    if not REPO_ID.fullmatch(repo_id) or ".." in repo_id or len(repo_id) > 96:
        raise QSVDError(f"--push-to-hub {repo_id!r} is not a Hub repo id: ORG/NAME (letters, digits, '-', '_', '.')")


@contextmanager
def push_errors(repo_id: str, again: str):
    """huggingface_hub's failures as one line, ending with `again`: where the export is kept."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except OfflineModeIsEnabled:
        raise QSVDError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set, so the Hub is not reached; {again}") from None
    except HfHubHTTPError as error:
        status = error.response.status_code
        why = ("the repo belongs to an account your token cannot write to, or the token is read-only"
               if status in (401, 403) else first_line(error))
        raise QSVDError(f"the Hub refused to write to {repo_id} (HTTP {status}): {why}; {again}") from None
    except OSError as error:  # the connection: httpx's errors are OSErrors
        raise QSVDError(f"cannot reach the Hub to push to {repo_id} ({type(error).__name__}: {first_line(error)}); "
                        f"{again}") from None


def push_to_hub(repo_id: str, contents: Path | dict[str, Path], private: bool, revision: str | None, kept: Path) -> str:
    """Upload `contents` (a directory, or repo names of files) to the model repo `repo_id`, on branch
    `revision` (default main) as one commit; the repo is made (private if asked) where it is missing."""
    from huggingface_hub import HfApi, get_token

    again = f"the export is complete and kept at {kept}; once fixed, run the same command with --overwrite"
    if get_token() is None:
        raise QSVDError(f"cannot push to {repo_id}: no Hugging Face token; log in with `hf auth login` (or set "
                        f"HF_TOKEN); {again}")
    api = HfApi()
    with push_errors(repo_id, again), tempfile.TemporaryDirectory() as staged:
        if isinstance(contents, dict):  # the files under their names in the repo, without copying them
            for name, path in contents.items():
                os.symlink(path.resolve(), Path(staged) / name)
        folder = contents if isinstance(contents, Path) else Path(staged)
        url = api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        console.print(f"uploading {kept} to {repo_id}" + (f" (branch {revision})" if revision else "") + " ...")
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                          commit_message=f"qsvd export of {kept.name}")
    console.print(f"pushed to {url}")
    return str(url)
