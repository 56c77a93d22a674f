"""One training per workdir: WORKDIR/lock, held with fcntl.flock, taken over from a dead holder."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from sscell.errors import SscellError
from sscell.training.workdir_lock import LOCK_FILE, workdir_lock

HOLD = "from sscell.training.workdir_lock import workdir_lock\nwith workdir_lock({!r}):\n    print('locked', flush=True)\n    input()"


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    workdir = str(tmp_path / "run")  # created by the lock
    with workdir_lock(workdir):
        record = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(SscellError, match=f"workdir {workdir} is in use by another run \\(pid {os.getpid()} on "
                                              f"{socket.gethostname()} since .*\\); wait for it"):
            with workdir_lock(workdir):
                pass
    with workdir_lock(workdir):  # released on exit
        pass


@pytest.mark.parametrize("ending", ["kill -9", "exit"])
def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, ending):
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(str(tmp_path))], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    with pytest.raises(SscellError, match=f"pid {holder.pid} on"):
        with workdir_lock(str(tmp_path)):
            pass
    if ending == "kill -9":
        holder.send_signal(signal.SIGKILL)
    else:
        holder.stdin.write("\n")
        holder.stdin.flush()
    holder.wait(timeout=60)
    with workdir_lock(str(tmp_path)):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
