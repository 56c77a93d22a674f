"""Evaluation tasks by name (`config.eval.tasks`), as pretext tasks are by `config.loss.name`.

A task is a function `score(inputs: Inputs, outcome: Outcome) -> None` that reads the embedded
cells (`inputs`) and adds its result columns to `outcome.rows[method]` for every method (the
model and the baselines), and optionally per-class F1, side tables, figures and a sentence
describing what it scored. It declares with `register(name, ...)`:

- `needs`: what the evaluation must prepare for it, a subset of NEEDS:
  "embeddings" (the run's checkpoint and the baselines embed the validation and test cells;
  their labels, donors and datasets come with them), "reconstructions" (the decoder's outputs
  on the test cells, all and masked genes: `inputs.reconstructions`), "ontology" (the Cell
  Ontology's descendants of the store's cell types: `inputs.descendants`). A task needing
  nothing (e.g. one that reads a result file) restores no checkpoint.
- `train_cells(settings) -> int | None`: how many training cells to embed (0: all; None:
  none; `inputs.train` holds them).
- `columns`: the result columns it adds (drawn as bars into bars_<name>.png when `bars`);
  `headline`: those of them the console summary shows.

A new task is one module that decorates its function with `@register("name", ...)`; a config
selects it with `config.eval.tasks = (..., "name")` and, for a module outside sscell,
`config.eval.module = "the.module"` (imported by `load_tasks` because the config names it).
See docs/extending.md ("Adding an evaluation task") and sscell/evaluation/example_task.py.
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

import ml_collections
import numpy as np
import pandas as pd

from sscell.data.store import Store
from sscell.errors import SscellError
from sscell.evaluation.cells import Cells, Reconstructions
from sscell.evaluation.metrics import f1_columns, per_class_f1

NEEDS = ("embeddings", "reconstructions", "ontology")


@dataclasses.dataclass
class Inputs:
    """What tasks score: the embedded cells of each split (`Cells`: embeddings by method, label
    codes "cell_type", "donor", "dataset"), the evaluation settings (`config.eval`) and the run."""

    settings: ml_collections.ConfigDict
    seed: int
    store: Store | None  # the evaluated cells' store (None when no task needs cells)
    workdir: str  # the run's
    outdir: str  # where results and figures go
    own_store: bool  # the run's own store is evaluated (not a transfer target)
    loss: str  # the run's pretext task
    methods: list[str] = dataclasses.field(default_factory=list)  # the model's first, then the baselines
    type_names: list[str] = dataclasses.field(default_factory=list)  # cell-type codes -> names
    val: Cells | None = None
    test: Cells | None = None
    train: Cells | None = None
    unintegrated: str = ""  # the baseline the integration scores compare against (PCA of log1p counts)
    reconstructions: Reconstructions | None = None  # None: the model has no decoder
    descendants: dict | None = None  # None: the store's cell types are not Cell Ontology terms
    aliases: dict[str, str] = dataclasses.field(default_factory=dict)  # method -> an earlier one, same embeddings

    def distinct(self) -> list[str]:
        """The methods whose embeddings differ from every earlier method's (score these, then `share`)."""
        return [m for m in self.methods if m not in self.aliases]

    def share(self, results: dict[str, object]) -> dict[str, object]:
        """`results` of the distinct methods, extended to every method (an alias gets its original's)."""
        return {m: results[self.aliases.get(m, m)] for m in self.methods}


@dataclasses.dataclass
class Outcome:
    """What the tasks produce: result columns per method, rows appended after them, per-class
    F1 columns, side tables, figures written, what was scored (one line per task), notes,
    footnotes (printed, and written under every markdown table) and the tasks that did not run."""

    rows: dict[str, dict]
    extra_rows: list[dict] = dataclasses.field(default_factory=list)
    per_class: dict[str, pd.Series] = dataclasses.field(default_factory=dict)
    tables: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
    files: list[str] = dataclasses.field(default_factory=list)
    described: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    footnotes: list[str] = dataclasses.field(default_factory=list)  # under every table: which baselines ran
    not_run: dict[str, str] = dataclasses.field(default_factory=dict)  # task -> why it had nothing to score

    def score(self, task: str, method: str, true: np.ndarray, pred: np.ndarray, type_names: list[str],
              descendants: dict | None) -> None:
        """F1 columns (`f1_columns`: `{task}_macro_f1`, ... + `_ontology`) and per-class F1."""
        self.rows[method].update(f1_columns(task, true, pred, descendants))
        table = per_class_f1(true, pred)
        table.index = [type_names[c] for c in table.index]
        self.per_class.setdefault("test_cells", table["support"])
        self.per_class[f"{task}: {method}"] = table["f1"]


def no_train_cells(settings) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class EvalTask:
    """An evaluation task: its scoring function and what it needs and produces (module docstring)."""

    name: str
    score: Callable[[Inputs, Outcome], None]
    needs: frozenset[str] = frozenset({"embeddings"})
    train_cells: Callable[[ml_collections.ConfigDict], int | None] = no_train_cells
    columns: tuple[str, ...] = ()
    headline: tuple[str, ...] = ()
    bars: bool = True


_TASKS: dict[str, EvalTask] = {}


def register(name: str, *, needs=("embeddings",), train_cells=no_train_cells, columns=(), headline=(),
             bars: bool = True) -> Callable:
    """Decorator that makes `score(inputs, outcome)` the evaluation task `name` (`EvalTask`'s fields)."""
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"evaluation task '{name}' needs {sorted(unknown)}; choose from {NEEDS}")

    def add(score: Callable) -> Callable:
        if name in _TASKS:
            raise ValueError(f"evaluation task '{name}' is registered twice")
        _TASKS[name] = EvalTask(name, score, frozenset(needs), train_cells, tuple(columns), tuple(headline), bars)
        return score
    return add


def registered() -> tuple[str, ...]:
    """The names of the registered tasks, in registration order (the built-ins first)."""
    return tuple(_TASKS)


def load_tasks(names, module: str = "") -> tuple[EvalTask, ...]:
    """The tasks `names` (names or a comma-separated string) selects, importing `module` (a
    config's `eval.module`) first if given."""
    if module:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise SscellError(f"cannot import eval.module '{module}' ({error}); check the module path and that "
                              "it is installed") from None
    names = tuple(t.strip() for t in (names.split(",") if isinstance(names, str) else names) if t.strip())
    unknown = [t for t in names if t not in _TASKS]
    if unknown or not names:
        raise SscellError(f"unknown evaluation task(s) {', '.join(unknown) or '(none given)'}; choose from "
                          f"{', '.join(_TASKS)} (eval.tasks or --tasks; a task of your own: eval.module)")
    return tuple(_TASKS[t] for t in dict.fromkeys(names))
