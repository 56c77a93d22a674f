"""Entry point: `python -m sscell.main --config=experiments/quickstart.py [--workdir=DIR] [--config.x=y]`.

Prepares the data, trains (or resumes) and, unless `--noeval`, evaluates the run, then prints
the wall times of training and evaluation. Every check
of the config against the data runs before anything is written into the workdir; one run at a
time trains in a workdir (WORKDIR/lock). On SIGTERM (preemption) training finishes its step,
saves a checkpoint and the command exits 0 without evaluating; on Ctrl-C the same, exit code
130. Ctrl-C before training starts (imports, checks, compilation) ends the command at once, exit
code 130, leaving nothing that blocks a rerun. Rerun the command to resume.
"""
from __future__ import annotations

from sscell.errors import ctrl_c_raises, exit_at_once_on_ctrl_c, exit_on_error

if __name__ == "__main__":  # before the imports below, which take seconds
    exit_at_once_on_ctrl_c()

import os
import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sscell.allocator import retain_freed_memory
from sscell.config import save_config
from sscell.config_help import config_help
from sscell.data.prepare import prepare_store
from sscell.data.store import open_store
from sscell.losses import load_task
from sscell.training import distributed
from sscell.training.resume import check_compatible, settle_dtype
from sscell.training.train import check_run, check_settings, train
from sscell.training.workdir_lock import workdir_lock

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. experiments/quickstart.py; any field can be overridden with "
    f"--config.FIELD=VALUE. The fields, with the defaults of sscell/config.py:\n{config_help()}", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config file name>).")
_EVAL = flags.DEFINE_bool("eval", True, "Evaluate the run once training is done.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
flags.mark_flags_as_required(["config"])


def default_workdir() -> str:
    """runs/<config file name without .py>."""
    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    return os.path.join("runs", os.path.splitext(os.path.basename(config_file))[0])


def run(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    config, workdir = _CONFIG.value, _WORKDIR.value or default_workdir()
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

    load_task(config.loss)  # an unknown task fails before any data is prepared
    check_settings(config)
    if config.data.store:  # every check before the workdir is created
        check_run(config, open_store(config.data.store))
    with workdir_lock(workdir):
        check_compatible(config, workdir)
        with ctrl_c_raises():  # the converter removes what it half wrote
            store = prepare_store(config, workdir)
        if not config.data.store:  # converted into the workdir: checked once it is there
            check_run(config, store)
        settle_dtype(config, n_genes=store.n_genes)  # a new run's "auto": the faster dtype here (saved below)
        if jax.process_index() == 0:
            save_config(config, workdir)
        started = time.perf_counter()
        finished = train(config, workdir, store).finished
        trained = time.perf_counter() - started
    times = [f"training: {trained:.0f} s wall time (this command's steps)"]
    if _EVAL.value and finished:  # not after a preemption
        from sscell.evaluation.evaluate import evaluate  # here: a bad command line fails without its imports

        started = time.perf_counter()
        with ctrl_c_raises():
            evaluate(workdir, eval_module=config.eval.module, loss_module=config.loss.module)  # your config's
        times.append(f"evaluation: {time.perf_counter() - started:.0f} s wall time")
    if jax.process_index() == 0:
        print("\n" + "\n".join(times))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag, config file or override reported in one line."""
    try:
        remaining = flags.FLAGS(argv)
        _CONFIG.value.to_dict()  # a config file that failed to load raises only when first used
    except Exception as error:  # noqa: BLE001 (absl and ml_collections raise many types here)
        message = " ".join(str(error).replace("\\n", " ").replace("\\'", "").strip("'").split())
        print(f"error: bad command line: {message}; see --helpfull for the flags", file=sys.stderr)
        sys.exit(2)
    return remaining


def main(argv: list[str]) -> None:
    """Runs `run`; bad input ends with one `error: ...` line and exit code 2."""
    retain_freed_memory()  # before the data and XLA threads allocate
    with exit_on_error():
        run(argv)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
