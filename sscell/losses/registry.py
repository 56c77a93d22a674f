"""Pretext tasks by name (`config.loss.name`).

A task is its loss plus the hooks around it:

- `loss(params, batch, key, *, model, config, train, extra, info) -> (loss, metrics)`, a pure
  function. `config` is the run's `config.loss` section; `train=False` (validation) turns
  dropout off but keeps the task's own randomness; `extra` is the task's non-gradient state;
  `info` the data facts (a `sscell.data.task_data.TaskInfo`, constants such as gene programmes).
  `batch` holds "x" (log1p(counts per 10k), cells x genes), "counts" (raw counts),
  "library" (total counts), "measured" (bool, cells x genes: genes the cell's dataset
  measured; unmeasured genes must never change a loss), "nonzeros" (the counts as the
  loader's flat CSR `(genes, counts, indptr)`, for work that only nonzeros need;
  `sscell.data.preprocess.densify` makes it dense) and the integer labels ("cell_type",
  "donor", "dataset").
- `build_model(config, info) -> flax module` (default: the autoencoder) for the run config and
  the data facts `info` (a `sscell.data.task_data.TaskInfo`). Every model has `n_genes` and an
  `encode(x, train)` method (the embedding); models with a decoder also have `reconstruct`.
- `init_extra(params, config)` and `update_extra(extra, params, step, config)`: state outside
  the gradient (BYOL's EMA target), kept in the train state as `state["extra"]`, so it is
  checkpointed and resumed exactly. `update_extra` runs after each optimiser update with the
  new params and the new step. Both get the whole run config.

A new task is one module that decorates its loss with `@register("name", ...)`; a config
selects it with `config.loss.name = "name"` and `config.loss.module = "the.module"` (imported
by `load_task`, also when a run is later evaluated from its workdir alone).
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

from sscell.errors import SscellError
from sscell.models.mlp import build_autoencoder


def no_extra(params, config) -> dict:
    """Tasks without state outside the gradient keep an empty `extra`."""
    return {}


def unchanged(extra, params, step, config):
    """The default `update_extra`: nothing to update."""
    return extra


@dataclasses.dataclass(frozen=True)
class Task:
    """A pretext task: its loss and how to build its model and non-gradient state."""

    name: str
    loss: Callable[..., tuple]
    build_model: Callable = build_autoencoder
    init_extra: Callable = no_extra
    update_extra: Callable = unchanged
    programmes: str = ""  # what TaskInfo must load: "", "sets" or "tf" (sscell.data.task_data)


_TASKS: dict[str, Task] = {}


def register(name: str, **hooks) -> Callable:
    """Decorator that makes a loss available as `config.loss.name = name`; `hooks` are the
    other `Task` fields (build_model, init_extra, update_extra, programmes)."""
    def add(loss: Callable) -> Callable:
        if name in _TASKS:
            raise ValueError(f"pretext task '{name}' is registered twice")
        _TASKS[name] = Task(name, loss, **hooks)
        return loss
    return add


def get_task(name: str) -> Task:
    """The registered task called `name`."""
    if name not in _TASKS:
        raise SscellError(f"unknown loss '{name}'; choose one of: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


def load_task(loss_config) -> Task:
    """The task a `config.loss` section names, importing `loss_config.module` first if given."""
    if loss_config.get("module"):
        try:
            importlib.import_module(loss_config.module)
        except ImportError as error:
            raise SscellError(f"cannot import loss.module '{loss_config.module}' ({error}); "
                              "check the module path and that it is installed") from None
    return get_task(loss_config.name)


def get_loss(name: str) -> Callable[..., tuple]:
    """The loss function of the task called `name`."""
    return get_task(name).loss
