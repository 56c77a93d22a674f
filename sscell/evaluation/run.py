"""A trained run opened for use: its config, its store and the parameters of one checkpoint.

    run = open_run("runs/quickstart")              # eval.checkpoint ("best" by default)
    run.model.apply({"params": run.params}, x, method="encode")

Only what using a model needs is read: the saved config, the store's metadata and the
checkpoint's parameters (a partial orbax restore: no optimiser state, no task state). The
model is rebuilt from the config and the store's shape facts (genes, cell types, measured-gene
table, width of a second modality); nothing of training is built (no loader, optimiser, class
counts, gene programmes or IDF statistics).
"""
from __future__ import annotations

import dataclasses
import functools
import os

import flax.linen as nn
import ml_collections

from sscell.config import load_config
from sscell.data.prepare import store_path
from sscell.data.store import Store, open_store
from sscell.data.task_data import TaskInfo, model_info
from sscell.errors import SscellError
from sscell.losses import load_task
from sscell.training import checkpoint as checkpoints

__all__ = ["Run", "open_run"]


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """A run's workdir, config, store, and the parameters (numpy) and step of its `checkpoint`."""

    workdir: str
    config: ml_collections.ConfigDict
    store: Store
    params: dict
    step: int
    checkpoint: str

    @functools.cached_property
    def info(self) -> TaskInfo:
        return model_info(self.config, self.store)

    @functools.cached_property
    def model(self) -> nn.Module:
        """The run's Flax module (its task's `build_model`), for `apply` with `params`."""
        return load_task(self.config.loss).build_model(self.config, self.info)


def open_run(workdir: str | os.PathLike, checkpoint: str | None = None, *, store: Store | None = None) -> Run:
    """The run in `workdir` at its "latest" or "best" `checkpoint` (default: its eval.checkpoint).

    `store`: the run's store when the caller has it open already (else it is opened from the
    run's config)."""
    workdir = str(workdir)
    config = load_config(workdir)
    which = checkpoint or config.eval.checkpoint
    saved = checkpoints.saved_state(workdir, config.train, which)
    if saved is None:
        raise SscellError(f"{workdir} has no {which} checkpoint yet; train first with python -m sscell.main")
    path, step = saved
    params = checkpoints.restore_params(path, checkpoints.params_metadata(path))
    return Run(workdir, config, store or open_store(store_path(config, workdir)), params, step, which)
