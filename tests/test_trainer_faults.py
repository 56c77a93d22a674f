"""Faults and processes, with the real command in subprocesses: a run killed with SIGKILL or
stopped with SIGTERM or Ctrl-C at an arbitrary step and rerun ends with the same parameters as
an uninterrupted run; a second run in a busy workdir is refused; two processes joined by
jax.distributed see the same global steps and losses as one process."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sscell.config import load_config
from sscell.data.store import open_store
from sscell.training import checkpoint
from sscell.training.mesh import make_mesh, replicated
from sscell.training.state import abstract_state
from sscell.training.train import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 60


def start(workdir, store, *extra, env=None):
    args = ["--config=experiments/quickstart.py", f"--workdir={workdir}", "--noeval", f"--config.data.store={store}",
            "--config.model.hidden=(32,32)", "--config.model.latent=8", f"--config.train.steps={STEPS}",
            "--config.train.batch_size=64", "--config.train.log_every=2", "--config.train.val_every=20",
            "--config.train.checkpoint_every=2", "--config.train.lr_decay_epochs=100",
            # a task without randomness: its loss does not depend on the order of cells in a batch,
            # which differs between one process and two (each shuffles its own slice)
            "--config.loss.name=supervised", "--config.model.dropout=0.0", *extra]
    return subprocess.Popen([sys.executable, "-m", "sscell.main", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def finish(process, expect=0, stderr=False):
    out, err = process.communicate(timeout=240)
    assert process.returncode == expect, err[-3000:]
    return (out, err) if stderr else out


def last_line(err):
    """The last line on stderr, checking that no traceback came before it."""
    assert "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


def logged_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def wait_until_logged(process, workdir, step):
    """Return once the run has logged `step` (it keeps running meanwhile)."""
    deadline = time.monotonic() + 180
    while not any(r["step"] >= step for r in logged_steps(workdir)):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before the signal"
        time.sleep(0.02)


def signal_after(process, workdir, step, signum):
    """Send `signum` once the run has logged `step`."""
    wait_until_logged(process, workdir, step)
    process.send_signal(signum)


def final_params(workdir):
    config = load_config(workdir)
    model, optimizer = build(config, open_store(config.data.store))[2:4]
    manager = checkpoint.checkpoint_manager(workdir, 2, 3)
    state, _ = checkpoint.restore(manager, abstract_state(model, optimizer, replicated(make_mesh(config.mesh))))
    manager.close()
    assert int(state["step"]) == STEPS
    return jax.device_get(state["params"])


@pytest.fixture(scope="module")
def straight(tiny_store, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    finish(start(workdir, tiny_store.path))
    return workdir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(500)
@pytest.mark.slow
def test_sigkill_sigterm_and_ctrl_c_then_rerun_equal_an_uninterrupted_run(straight, tiny_store, tmp_path):
    killed, stopped, interrupted = tmp_path / "killed", tmp_path / "stopped", tmp_path / "interrupted"
    runs = {workdir: start(workdir, tiny_store.path) for workdir in (killed, stopped, interrupted)}
    signal_after(runs[killed], killed, 14, signal.SIGKILL)
    signal_after(runs[stopped], stopped, 20, signal.SIGTERM)
    signal_after(runs[interrupted], interrupted, 16, signal.SIGINT)
    finish(runs[killed], expect=-signal.SIGKILL)
    out = finish(runs[stopped])
    preempted = int(out.split("preempted at step ")[1].split(":")[0])
    manager = checkpoint.checkpoint_manager(stopped, 2, 3)
    assert 20 <= preempted < STEPS and manager.latest_step() == preempted
    manager.close()
    _, err = finish(runs[interrupted], expect=130, stderr=True)
    line = last_line(err)
    stopped_at = int(line.split("interrupted: training stopped at step ")[1].split(",")[0])
    assert line.endswith(", checkpoint saved; rerun the same command to resume")
    manager = checkpoint.checkpoint_manager(interrupted, 2, 3)
    assert 16 <= stopped_at < STEPS and manager.latest_step() == stopped_at
    manager.close()

    reruns = [start(workdir, tiny_store.path) for workdir in (killed, stopped, interrupted)]
    for process in reruns:
        assert "resuming at step" in finish(process)
    expected = final_params(straight)
    for workdir in (killed, stopped, interrupted):
        for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(final_params(workdir)), strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_a_second_run_in_a_busy_workdir_is_refused_until_the_first_dies(tiny_store, tmp_path):
    first = start(tmp_path, tiny_store.path, "--config.train.steps=100000")
    wait_until_logged(first, tmp_path, 4)
    _, err = finish(start(tmp_path, tiny_store.path), expect=2, stderr=True)
    assert last_line(err).startswith(f"error: workdir {tmp_path} is in use by another run (pid {first.pid} on "
                           f"{socket.gethostname()} since ")
    first.send_signal(signal.SIGKILL)  # its lock dies with it
    finish(first, expect=-signal.SIGKILL)
    assert "training already complete" in finish(start(tmp_path, tiny_store.path, "--config.train.steps=2"))


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_ctrl_c_while_converting_ends_with_one_line_and_code_130(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "sscell.main", "--config=experiments/quickstart.py", f"--workdir={tmp_path}",
         "--config.data.synthetic.n_cells=3000000"], cwd=ROOT, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"})
    assert process.stdout.readline().startswith("generating a synthetic atlas")
    process.send_signal(signal.SIGINT)
    _, err = finish(process, expect=130, stderr=True)
    assert err == "interrupted\n"
    assert sorted(os.listdir(tmp_path)) == ["lock"]  # no half-written atlas


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_two_processes_match_one_process(straight, tiny_store, tmp_path):
    port = free_port()
    processes = [start(tmp_path, tiny_store.path, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                       f"--process_id={i}") for i in range(2)]
    outputs = [finish(p) for p in processes]
    assert "2 device(s)" in outputs[0]
    one, two = logged_steps(straight), logged_steps(tmp_path)
    assert [r["step"] for r in two] == [r["step"] for r in one] and two[-1]["step"] == STEPS
    np.testing.assert_allclose([r["train/loss"] for r in two], [r["train/loss"] for r in one], rtol=1e-5)
    np.testing.assert_allclose(two[-1]["val/loss"], one[-1]["val/loss"], rtol=1e-5)
