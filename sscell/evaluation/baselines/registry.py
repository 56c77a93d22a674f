"""Baselines by name (`config.eval.baselines`), as evaluation tasks are by `eval.tasks`.

A baseline is a function `fit(data: FitData) -> Fitted` registered with `register(name, ...)`.
It fits on the evaluated store's cells (`FitData`, read on first use: the first
`eval.baseline_cells` validation cells' log1p input, their highly variable genes, training
cells' counts) and returns an object with `method` (its rows' name in the results),
`fit_seconds` (its fit's wall time, next to the model's training time) and `embed(cells) ->
(cells, dims) float32` of a batch of cells (`CellBatch`). A baseline that `reconstructs` also
has `reconstruct(x) -> x_hat` (log1p input of every gene). One fitted on each split's own cells
(the study's PCA) has `finish(parts) -> (cells, dims)`, which embeds a split from what `embed`
returned for its batches.

It declares with `register`: `label` (what the console calls it), `settings` (the `eval` fields
its embeddings depend on) and `packages` (libraries whose versions they depend on): both key its
cache files (`sscell.evaluation.cells.BaselineCache`); `cached=False` when embedding costs
nothing. A baseline that cannot run here (an optional library missing) raises `Skipped(reason)`:
the evaluation scores the others and says why.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple, Protocol

import ml_collections
import numpy as np
import scipy.sparse as sp

from sscell.data.genes import highly_variable_genes
from sscell.errors import SscellError


class CellBatch(NamedTuple):
    """A batch of evaluated cells: the model's log1p input `x` and the `counts` it came from
    (cells x genes, dense; unmeasured genes 0 in both)."""

    x: np.ndarray
    counts: np.ndarray


class Fitted(Protocol):
    method: str
    fit_seconds: float

    def embed(self, cells: CellBatch) -> np.ndarray: ...


class Skipped(Exception):
    """This baseline cannot run here; the message says why and what to do."""


class FitData:
    """What baselines fit on, read from the evaluated store on first use. `read(split, limit)`
    yields the `CellBatch`es of the first `limit` cells of `split` (0: all)."""

    def __init__(self, settings: ml_collections.ConfigDict, seed: int,
                 read: Callable[[str, int], Iterator[CellBatch]]):
        self.settings, self.seed, self._read = settings, seed, read

    @functools.cached_property
    def val_x(self) -> sp.csr_matrix:
        """The log1p input of the first `eval.baseline_cells` validation cells."""
        return sp.vstack([sp.csr_matrix(b.x) for b in self._read("val", self.settings.baseline_cells)], format="csr")

    @functools.cached_property
    def hvg(self) -> tuple[np.ndarray, float]:
        """The `eval.hvg_genes` highly variable genes of `val_x` (ascending indices) and the
        seconds choosing them took (part of the fit time of every baseline that uses them)."""
        val_x = self.val_x
        started = time.perf_counter()
        return highly_variable_genes(val_x, self.settings.hvg_genes), time.perf_counter() - started

    def train_counts(self, n: int, genes: np.ndarray) -> sp.csr_matrix:
        """The counts of `genes` in the first `n` training cells (a random sample: a store keeps
        each split in a seeded random order)."""
        parts = [sp.csr_matrix(b.counts[:, genes]) for b in self._read("train", n)]
        if not parts:
            raise SscellError("the store has no train cells to fit a baseline on; convert it with a train split")
        return sp.vstack(parts, format="csr")


@dataclasses.dataclass(frozen=True)
class Baseline:
    """A registered baseline: its fit function and what its embeddings depend on (module docstring)."""

    name: str
    label: str
    fit: Callable[[FitData], Fitted]
    settings: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    reconstructs: bool = False
    cached: bool = True


_BASELINES: dict[str, Baseline] = {}


def register(name: str, *, label: str, settings: tuple[str, ...] = (), packages: tuple[str, ...] = (),
             reconstructs: bool = False, cached: bool = True) -> Callable:
    """Decorator that makes `fit(data) -> Fitted` the baseline `name` (`Baseline`'s fields)."""

    def add(fit: Callable[[FitData], Fitted]) -> Callable[[FitData], Fitted]:
        if name in _BASELINES:
            raise ValueError(f"baseline '{name}' is registered twice")
        _BASELINES[name] = Baseline(name, label, fit, tuple(settings), tuple(packages), reconstructs, cached)
        return fit
    return add


def registered() -> tuple[str, ...]:
    """The names of the registered baselines, in registration order."""
    return tuple(_BASELINES)


def load_baselines(names) -> tuple[Baseline, ...]:
    """The baselines `names` (names or a comma-separated string; may be empty) selects, in its order."""
    names = tuple(b.strip() for b in (names.split(",") if isinstance(names, str) else names) if b.strip())
    unknown = [b for b in names if b not in _BASELINES]
    if unknown:
        raise SscellError(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(_BASELINES)} "
                          "(eval.baselines or --baselines)")
    return tuple(_BASELINES[b] for b in dict.fromkeys(names))
