"""The one exception type that sscell raises for bad input or bad configuration, and how
command-line entry points end on it or on Ctrl-C."""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
from collections.abc import Iterator

INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C


class SscellError(Exception):
    """A problem the user can fix; its message is one line naming the problem and the fix."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, raised once what had to be kept is saved; its message says what was kept."""


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
    """For command-line entry points: an SscellError becomes `error: ...` on stderr and exit code 2;
    Ctrl-C becomes `interrupted[: what was kept]` on stderr and exit code 130, without a traceback."""
    try:
        yield
    except SscellError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as interrupt:
        print(f"interrupted: {interrupt}" if str(interrupt) else "interrupted", file=sys.stderr, flush=True)
        atexit.register(_silence_stderr)  # runs before the handlers registered earlier
        sys.exit(INTERRUPTED_EXIT_CODE)


def _silence_stderr() -> None:
    """At exit after Ctrl-C: the interpreter's teardown still runs (atexit flushes), but a library
    interrupted mid-call may complain there (zarr: "Cannot close a running event loop", with a
    traceback); the `interrupted` line stays the last word."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)


def _exit_interrupted(signum: int, frame) -> None:
    """Ctrl-C where nothing needs cleaning up: `interrupted` on stderr, exit code 130, at once. A
    KeyboardInterrupt raised there could be swallowed (in an import, a gc callback) or crash the
    interpreter's teardown under XLA's threads."""
    with contextlib.suppress(Exception):  # a write to stdout the signal interrupted cannot be flushed
        sys.stdout.flush()
        sys.stderr.flush()
    os.write(2, b"interrupted\n")
    os._exit(INTERRUPTED_EXIT_CODE)


def exit_at_once_on_ctrl_c() -> None:
    """From now on Ctrl-C ends the process at once with exit code 130 (`ctrl_c_raises` for a block
    that cleans up on KeyboardInterrupt); nothing changes where SIGINT is ignored (nohup, `cmd &`)."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _exit_interrupted)


@contextlib.contextmanager
def ctrl_c_raises() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt in the block, where `exit_at_once_on_ctrl_c` would end the
    process: for work that removes what it half wrote."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is _exit_interrupted:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
