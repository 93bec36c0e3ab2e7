"""The one exception type a user sees as a one-line message instead of a traceback, the clause
that quotes a library's error in one, and the turning of running out of memory into one; what a
full disk looks like; how qsvd takes a signal."""

import errno
import os
import signal
from contextlib import contextmanager


class QSVDError(Exception):
    """A problem with the user's input, with a message that names it and the fix."""


def first_line(error: BaseException) -> str:
    """An exception's first line and type, as a clause of qsvd's one-line messages."""
    lines = str(error).strip().splitlines()
    module = type(error).__module__
    kind = type(error).__qualname__ if module == "builtins" else f"{module}.{type(error).__qualname__}"
    return f"{lines[0] if lines else 'no message'} ({kind})"


OUT_OF_MEMORY_MESSAGES = ("out of memory", "not enough memory", "can't allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    """A GPU or CPU allocation failure (torch.OutOfMemoryError, MemoryError or the CPU allocator's)."""
    return isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and any(text in str(error) for text in OUT_OF_MEMORY_MESSAGES))


@contextmanager
def out_of_memory_advice(doing: str, advice: str):
    """Turn running out of memory into a QSVDError that says what was being done and what helps."""
    try:
        yield
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        raise QSVDError(f"out of memory while {doing}; to need less: {advice}") from error


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# as the writers say it: OSError's strerror, safetensors' "(os error 28)" text, torch.save's own
DISK_FULL_MESSAGES = (*map(os.strerror, DISK_FULL_ERRNOS), "file write failed")


def is_disk_full(error: BaseException) -> bool:
    """A write that failed for lack of space (a full disk, a quota, a file-size limit)."""
    return (isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS) or (
        isinstance(error, Exception) and any(text in str(error) for text in DISK_FULL_MESSAGES))


class Interrupted(BaseException):
    """SIGINT (Ctrl-C, a notebook's stop button) or SIGTERM (a preempted job). A BaseException, as
    KeyboardInterrupt is, so that no `except Exception` takes it for an error; the exit code is
    128 + the signal's number (130, 143)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}; nothing half-written was kept")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def raise_interrupted(signum: int, frame=None) -> None:
    """A signal handler: stop where the program is, through every `finally` (temporaries are removed)."""
    raise Interrupted(signum)


def handle_signal(signum: int, handler):
    """`handler` for `signum`, unless the process was started with it ignored (a job a script put in
    the background ignores Ctrl-C; `nohup`), which it stays, as Python leaves an ignored SIGINT.
    Returns the handler before, to restore."""
    previous = signal.getsignal(signum)
    if previous is not signal.SIG_IGN:
        signal.signal(signum, handler)
    return previous
