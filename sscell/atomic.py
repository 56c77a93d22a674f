"""Write to a temporary file or folder beside the target, then rename it into place: a reader
(or a rerun after kill -9) sees the old version or the new one, never half of one.

Temporaries are hidden and named for what they are (`.NAME.PID.tmp`, `.NAME.tmp-PID`), so no
reader takes one for the output; those left by a killed writer (its pid gone) are removed by the
next write of the same target.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

_RENAME_EXCHANGE, _AT_FDCWD = 2, -100  # Linux renameat2: swap two paths in one step


def _gone(pid: int) -> bool:
    """Whether process `pid` (on this host) no longer runs; this process counts as gone (its
    leftovers are from an earlier write)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _clear_stale(path: Path) -> None:
    """Remove the temporaries of `path` whose writer is gone; an old folder set aside by a writer
    killed before its new one landed takes its place again."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)\.tmp|(tmp|old)-(\d+))")
    for leftover in path.parent.glob(f".{path.name}.*"):
        found = pattern.fullmatch(leftover.name)
        if not found or not _gone(int(found.group(1) or found.group(3))):
            continue
        if found.group(2) == "old" and not os.path.lexists(path):
            leftover.rename(path)
        elif leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


@functools.cache
def _renameat2():
    """libc's renameat2, or None where the C library lacks it (looked up once)."""
    return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)


def _exchange(a: Path, b: Path) -> bool:
    """Swap paths `a` and `b` atomically; False where the system or its file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_in(new: Path, path: Path) -> None:
    """Put folder `new` at `path` in one step where the system can; what was at `path` ends up at
    `new`. Concurrent writers each land whole; the last one stays."""
    while True:
        if not os.path.lexists(path):
            try:
                new.rename(path)
                return
            except OSError as error:  # another writer landed first: swap with it
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
        else:
            try:
                if _exchange(new, path):
                    return
            except FileNotFoundError:  # another writer moved it away meanwhile
                continue
            # two renames: a writer killed between them leaves the old folder aside, put back by _clear_stale
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            new.rename(path)
            old.rename(new)
            return


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields `.NAME.PID.tmp` beside `path` to write; on success it replaces `path`. The temporary
    file is removed whatever happens (a kill -9 leaves it: the next write of `path` removes it)."""
    path = Path(path)
    _clear_stale(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty `.NAME.tmp-PID` folder beside `path` to fill; on success it takes the place
    of `path` in one step (`_swap_in`: a reader finds the old folder or the new one, never none),
    and the old one is deleted. On failure `path` keeps what it held, and the temporary is removed."""
    path = Path(path)
    _clear_stale(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        _swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
