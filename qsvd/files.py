"""Files on disk: how qsvd publishes what it writes, seals it, and keeps two writers apart.

- `publish(target, write)`: every file and directory qsvd makes (runs, checkpoints, prepared
  models, exports, predictions, GGUF files, converted configs) is written under a temporary name
  beside `target`, then put in place by one rename: a reader never sees half of it, and a killed
  writer leaves only a temporary, which the next writer of that target removes.
- `write_manifest` / `seal_problem`: a sealed directory lists the sha256 of its files; one check
  tells whether the files still match it.
- `one_writer(target)`: an flock that keeps a second process off the same target.
- `prefetch`, `read_ahead`: the disk reads while the CPU works.
"""

import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from .console import console
from .errors import QSVDError

K, V = TypeVar("K"), TypeVar("V")
MANIFEST = "manifest.json"


def cache_dir() -> Path:
    """Where converted and prepared models live: $QSVD_CACHE, or ~/.cache/qsvd."""
    return Path(os.environ.get("QSVD_CACHE", "~/.cache/qsvd")).expanduser()


# -- publication -----------------------------------------------------------------------------

def publish(target: Path, write: Callable[[Path], None], directory: bool = True) -> Path:
    """Run `write(tmp)` on a temporary directory (or file) beside `target`, then rename it to
    `target`, replacing what was there only now; the temporary is gone however `write` ends."""
    remove_stale_temps(target)
    make = tempfile.mkdtemp if directory else tempfile.mkstemp
    made = make(prefix=f".{target.name}.", suffix=temp_suffix(), dir=target.parent)
    if not directory:
        os.close(made[0])
    tmp = Path(made if directory else made[1])
    try:
        write(tmp)
        tmp.chmod(0o755 if directory else 0o644)  # mkdtemp's and mkstemp's 0700 would hide it from other users
        move_into_place(tmp, target)
    finally:
        remove(tmp)
    return target


def move_into_place(staged: Path, target: Path) -> None:
    """Rename the finished `staged` to `target`. A rename replaces a file by a file; any other old
    `target` (a directory, or a file where a directory goes) is renamed aside first and removed once
    the new one is in place, or put back if it cannot be."""
    if not os.path.lexists(target) or (staged.is_file() and not target.is_dir()):
        os.replace(staged, target)
        return
    old = target.with_name(f".{target.name}.old{temp_suffix()}")
    remove(old)
    os.replace(target, old)
    try:
        os.replace(staged, target)
    except BaseException:
        os.replace(old, target)
        raise
    remove(old)


def remove(path: Path) -> None:
    """Remove a file or a directory tree, if it is there."""
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def temp_suffix() -> str:
    """A temporary name's end: the writer's host and pid, so that what a killed writer left is found."""
    return f".{host_name()}-{os.getpid()}.tmp"


def host_name() -> str:
    return socket.gethostname().replace(".", "_")  # no dots: the pid follows the last one


def remove_stale_temps(target: Path) -> None:
    """Make target's parent, and remove the temporary copies of `target` whose writer on this host is gone."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*.{host_name()}-*.tmp"):
        if not pid_alive(int(stale.name.rsplit("-", 1)[-1].removesuffix(".tmp"))):
            remove(stale)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- seals -----------------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    """The sha256 of a file, read 16 MiB at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, **fields) -> None:
    """Seal `directory`: manifest.json with `fields` and the sha256 of every file in it (published
    last, by its own rename), under "sha256" unless `fields` gives them."""
    if "sha256" not in fields:
        names = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
        fields["sha256"] = {str(p.relative_to(directory)): file_sha256(p) for p in names}
    text = json.dumps(fields, indent=2) + "\n"
    publish(directory / MANIFEST, lambda tmp: tmp.write_text(text), directory=False)


def read_manifest(directory: Path) -> dict | None:
    """A sealed directory's manifest, or None if it has none that can be read."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("sha256"), dict) else None


def seal_problem(directory: Path, sha256: dict[str, str], checksums: bool = True) -> str | None:
    """Why the files of `directory` do not match their recorded `sha256` (name → digest), or None
    if they do; the digests are compared only with `checksums` (else only their presence)."""
    if not sha256:
        return "corrupt (its manifest lists no files)"
    for name, digest in sha256.items():
        if not (directory / name).is_file():
            return f"incomplete ({name} is missing)"
        if checksums and file_sha256(directory / name) != digest:
            return f"corrupt ({name} does not match its checksum)"
    return None


# -- one writer a target ---------------------------------------------------------------------

def check_writable(target: Path, what: str = "--output") -> None:
    """`target` can be made in its folder (it and its temporaries are written beside it, then renamed):
    the nearest existing folder on its path is a folder, and this user may write in it."""
    existing = next(folder for folder in target.absolute().parents if folder.exists())
    if not existing.is_dir():
        raise QSVDError(f"{what} {target}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = ("it is on a read-only filesystem" if os.statvfs(existing).f_flag & os.ST_RDONLY else
                  "this user may not write in it")
        raise QSVDError(f"{what} {target}: cannot write in {existing}: {reason}")


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse to mix outputs: an existing non-empty output dir needs --overwrite; and one that cannot be written."""
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise QSVDError(f"--output {output} already holds files; choose another --output or pass --overwrite")
    check_writable(output)


@contextmanager
def one_writer(target: Path, wait: bool, what: str = "--output") -> Iterator[None]:
    """Be `target`'s only writer meanwhile: hold an exclusive lock on `.<name>.lock` beside it, marked
    with this writer's host and pid. The kernel (flock) releases it when the holder ends, however
    it ends, so a dead writer's mark never blocks. `wait`: until the other writer is done (it may
    have made what this one would make); else a QSVDError that names it."""
    check_writable(target, what)
    lock = target.with_name(f".{target.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace") or "another process"
            if not wait:
                os.close(fd)
                raise QSVDError(f"{what} {target} is being written now by {holder}; wait for it to finish, or "
                                f"choose another {what}") from None
            console.print(f"waiting for {holder}, which is writing {target} ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break  # still the lock file: its last holder did not remove it meanwhile
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"process {os.getpid()} on {socket.gethostname()}".encode())
        except OSError:
            pass  # a full disk: the lock holds without its mark, and the writer meets the full disk itself
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still held, so that no one waits on a removed file
        os.close(fd)


# -- reading ahead ---------------------------------------------------------------------------

def prefetch(paths: Iterable[Path], advice: int | None = None) -> None:
    """Ask the kernel to start reading the files into the page cache (Linux's posix_fadvise
    WILLNEED returns at once), so that the disk works while the CPU does something else; or give
    it another `advice` (DONTNEED drops them, for a benchmark that reads from the disk)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # only a hint: the read that follows says what is wrong with the file
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED if advice is None else advice)
        finally:
            os.close(fd)


def read_ahead(keys: Iterable[K], read: Callable[[K], V]) -> Iterator[tuple[K, V]]:
    """(key, read(key)) for each key in order, the next read running in a thread while the caller
    works on this one (torch, file reads and hashlib let go of the GIL): reading overlaps the work."""
    keys = list(keys)
    with ThreadPoolExecutor(max_workers=1) as pool:
        upcoming = pool.submit(read, keys[0]) if keys else None
        for i, key in enumerate(keys):
            value = upcoming.result()
            if i + 1 < len(keys):
                upcoming = pool.submit(read, keys[i + 1])
            yield key, value
