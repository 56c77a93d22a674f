"""The one exception type that sscell raises for bad input or bad configuration, and how
command-line entry points end on it or on Ctrl-C."""
from __future__ import annotations

import contextlib
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
        print(f"interrupted: {interrupt}" if str(interrupt) else "interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
