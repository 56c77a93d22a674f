"""One training at a time per workdir: an exclusive `fcntl.flock` on WORKDIR/lock.

The kernel releases the lock when its holder exits, however it exits (kill -9 included), so a
lock left behind by a dead run is simply taken over. The file holds the holder's pid, host and
start time, for the message that refuses a second run. Only process 0 of a multi-host run
locks; the others learn whether it could.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from sscell.errors import SscellError

LOCK_FILE = "lock"


def _holder(fd: int) -> str:
    """'pid P on HOST since TIME' from the lock file's record (what is readable of it)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        record = {}
    return (f"pid {record.get('pid', '?')} on {record.get('host', '?')} since "
            f"{record.get('started', '?')}")


@contextlib.contextmanager
def _flock(workdir: str) -> Iterator[None]:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SscellError(f"workdir {workdir} is in use by another run ({_holder(fd)}); wait for it to "
                              "finish, stop it, or use another --workdir") from None
        os.ftruncate(fd, 0)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.pwrite(fd, json.dumps(record).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # the file stays (removing it could race a run opening it); empty: free
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """Hold WORKDIR/lock for the block (process 0); raises SscellError, naming the holder, if
    another live run holds it. In a multi-host run every process raises if process 0 could not lock."""
    if jax.process_count() == 1:
        with _flock(workdir):
            yield
        return
    with contextlib.ExitStack() as stack:
        error = None
        if jax.process_index() == 0:
            try:
                stack.enter_context(_flock(workdir))
            except SscellError as refused:
                error = refused
        locked = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if error is not None:
            raise error
        if not int(locked):
            raise SscellError(f"workdir {workdir} is in use by another run (process 0 could not lock it); "
                              "wait for it to finish, stop it, or use another --workdir")
        yield
