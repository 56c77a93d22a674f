"""The one exception type that sscell raises for bad input or bad configuration."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class SscellError(Exception):
    """A problem the user can fix; its message is one line naming the problem and the fix."""


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
    """For command-line entry points: an SscellError becomes `error: ...` on stderr and exit code 2."""
    try:
        yield
    except SscellError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
