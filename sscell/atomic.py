"""Write to a temporary file or folder beside the target, then rename it into place: a reader
(or a rerun after kill -9) sees the old version or the new one, never half of one."""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields `.NAME.PID.tmp` beside `path` to write; on success it replaces `path`. The temporary
    file is removed whatever happens (a kill -9 leaves it: the next write of this pid overwrites it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty `.NAME.tmp-PID` folder beside `path` to fill; on success it takes the place
    of `path` (a folder there is moved aside first and deleted after). On failure `path` keeps
    what it held, and the temporary folders are removed."""
    path = Path(path)
    tmp, old = (path.with_name(f".{path.name}.{what}-{os.getpid()}") for what in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        if path.exists():
            path.rename(old)
        tmp.rename(path)
    finally:
        if old.exists() and not path.exists():  # the new one failed to land: keep the old one
            old.rename(path)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
