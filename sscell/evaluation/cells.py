"""The evaluated cells: a run's embeddings of a store's splits, its reconstructions, and the baselines'.

The baselines (`eval.baselines`, registered in `sscell.evaluation.baselines`) do not depend on
the checkpoint: their embeddings, fit times and reconstruction scores are cached per baseline,
store, split and the settings it depends on (`BaselineCache`), so a rerun, or another
checkpoint of the same data, does not refit them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
from pathlib import Path

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from sscell.atomic import atomic_file
from sscell.data.loader import sequential_batches
from sscell.data.store import Store, resolved_location
from sscell.errors import SscellError
from sscell.evaluation.baselines import Baseline, CellBatch, FitData, Fitted, Skipped, load_baselines
from sscell.evaluation.metrics import ExplainedVariance
from sscell.evaluation.run import Run
from sscell.losses.masking import mask_input, random_gene_mask, rescales_inputs
from sscell.training.step import task_batch

LABELS = ("cell_type", "donor", "dataset")
CACHE_VERSION = 2  # bump when what the cache holds, or how it is computed, changes


@dataclasses.dataclass
class Cells:
    """Evaluated cells of one split: embeddings by method, and label codes (cell_type, donor, dataset)."""

    embeddings: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.labels["cell_type"])

    def subset(self, rows) -> Cells:
        return Cells({k: v[rows] for k, v in self.embeddings.items()}, {k: v[rows] for k, v in self.labels.items()})

    def first(self, n: int) -> Cells:
        """The first `n` cells (0: all)."""
        return self.subset(slice(0, n or None))

    @staticmethod
    def concat(parts: list[Cells]) -> Cells:
        return Cells({k: np.concatenate([p.embeddings[k] for p in parts]) for k in parts[0].embeddings},
                     {k: np.concatenate([p.labels[k] for p in parts]) for k in parts[0].labels})

    @staticmethod
    def held_out(val: Cells, test: Cells, n: int, seed: int) -> Cells:
        """A seeded random sample of `n` (all if fewer) validation and test cells, in that order."""
        both = Cells.concat([val, test])
        if len(both) <= n:
            return both
        return both.subset(np.sort(np.random.default_rng(seed).choice(len(both), n, replace=False)))


class Reconstructions:
    """Explained variance columns by method: accumulators (method, "all" | "masked") ->
    ExplainedVariance, or columns already computed (the cached baseline's)."""

    def __init__(self):
        self.scores: dict[tuple[str, str], ExplainedVariance] = {}
        self.known: dict[str, dict[str, float]] = {}

    def update(self, method: str, which: str, x, x_hat, mask) -> None:
        self.scores.setdefault((method, which), ExplainedVariance()).update(x, x_hat, mask)

    def columns(self, method: str) -> dict[str, float]:
        """`recon_ev_weighted`, ..., `recon_masked_mse` of `method` ({} if it does not reconstruct)."""
        if method in self.known:
            return dict(self.known[method])
        return {f"recon_{'' if which == 'all' else 'masked_'}{k}": v
                for (m, which), ev in self.scores.items() if m == method for k, v in ev.result().items()}


@dataclasses.dataclass
class BaselineRun:
    """A baseline's embeddings of one split's cells, its fit time and (the `reconstructs` kind,
    on reconstructed cells) its reconstruction columns."""

    method: str
    fit_seconds: float
    embedding: np.ndarray
    recon: dict[str, float]


class BaselineCache:
    """Each cached baseline's `BaselineRun` of one split's cells, in
    `folder`/<baseline>_<key>.npz: key = store location and format, split, cells, seed, the
    baseline's `settings` (and, when it reconstructs, the mask's), its `packages`' versions.
    Written atomically, read without pickle; a file that cannot be read is recomputed."""

    def __init__(self, folder: str | os.PathLike, store: Store, settings: ml_collections.ConfigDict, seed: int):
        self.folder, self.settings = Path(folder), settings
        root = Path(resolved_location(store.path))
        marker = root / "zarr.json"
        stamp = marker.stat().st_mtime_ns if marker.exists() else 0  # a store converted anew at the same path
        self.base = {"version": CACHE_VERSION, "store": str(root), "stamp": stamp, "cells": store.n_cells,
                     "genes": store.n_genes, "seed": seed, "batch_size": settings.batch_size}

    def path(self, baseline: Baseline, split: str, limit: int, reconstruct: bool) -> Path:
        reconstruct = reconstruct and baseline.reconstructs
        depends = {k: self.settings[k] for k in baseline.settings + (("mask_rate",) if reconstruct else ())}
        versions = {package: installed_version(package) for package in baseline.packages}
        key = json.dumps({**self.base, **depends, "baseline": baseline.name, "packages": versions, "split": split,
                          "limit": limit, "reconstruct": reconstruct}, sort_keys=True)
        return self.folder / f"{baseline.name}_{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"

    def read(self, baseline: Baseline, split: str, limit: int, reconstruct: bool) -> BaselineRun | None:
        """The cached run, or None when there is none."""
        try:
            with np.load(self.path(baseline, split, limit, reconstruct), allow_pickle=False) as saved:
                recon = dict(zip((str(k) for k in saved["recon_keys"]), saved["recon_values"].tolist()))
                return BaselineRun(str(saved["method"]), float(saved["fit_seconds"]), saved["embedding"], recon)
        except (OSError, KeyError, ValueError):
            return None

    def write(self, baseline: Baseline, split: str, limit: int, reconstruct: bool, run: BaselineRun) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        arrays = dict(method=np.asarray(run.method), fit_seconds=np.asarray(run.fit_seconds),
                      embedding=run.embedding, recon_keys=np.asarray(list(run.recon), dtype=str),
                      recon_values=np.asarray(list(run.recon.values()), np.float64))
        with atomic_file(self.path(baseline, split, limit, reconstruct)) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)  # a file object: np.savez would append .npz to a name


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


class Evaluator:
    """Embeds a store's splits with a run's parameters and the `eval.baselines`, batch by batch.

    `reconstruct`: the test cells are also reconstructed, from all their genes and with a seeded
    `eval.mask_rate` of them hidden (`Reconstructions`), by the model and the baselines that
    reconstruct. Baselines are fitted on first use (`FitData`); one that cannot run here is left
    out (`skipped`: its label -> why)."""

    def __init__(self, run: Run, store: Store, settings, method: str, reconstruct: bool,
                 cache: BaselineCache | None = None):
        self.params, self.store, self.settings, self.method = run.params, store, settings, method
        self.reconstruct, self.cache = reconstruct, cache
        self.table = store.measured if len(store.measured) else np.ones((1, store.n_genes), bool)
        self.key = jax.random.key(run.config.seed)
        self.baselines = load_baselines(settings.baselines)
        self.fit_data = FitData(settings, run.config.seed, self._cell_batches)
        self.fitted: dict[str, Fitted] = {}
        self.skipped: dict[str, str] = {}  # label -> why
        self.ran: dict[str, BaselineRun] = {}  # name -> its run on the last split embedded (method, fit time)
        self.fit_seconds: dict[str, float] = {}  # name -> the fit time first seen (one per baseline, every split)
        model, n_genes, rate = run.model, run.store.n_genes, settings.mask_rate
        rescale = rescales_inputs(run.config.loss)  # the masked input as the run trained on it

        def inputs(batch, table):
            view = task_batch(batch, n_genes, table)  # the model's training-time input
            return {"x": view["x"], "counts": view["counts"]}, view["measured"]

        @jax.jit
        def prepare(batch, table):
            return inputs(batch, table)[0]

        @jax.jit
        def embed(params, batch, table):
            prepared, _ = inputs(batch, table)
            return {**prepared, "z": model.apply({"params": params}, prepared["x"], method="encode")}

        @jax.jit
        def embed_and_reconstruct(params, batch, table, key):
            prepared, measured = inputs(batch, table)
            x = prepared["x"]
            hidden = random_gene_mask(key, x.shape, rate) & measured
            return {**prepared, "z": model.apply({"params": params}, x, method="encode"), "measured": measured,
                    "hidden": hidden, "x_hat": model.apply({"params": params}, x, measured, method="reconstruct"),
                    "x_hat_masked": model.apply({"params": params}, mask_input(x, hidden, rate, rescale), measured,
                                                method="reconstruct")}

        self._prepare, self._embed, self._embed_and_reconstruct = prepare, embed, embed_and_reconstruct

    def _batches(self, split: str, limit: int, mode: str):
        """(batch, valid rows, outputs) of the first `limit` cells of `split`; `mode`: "prepare"
        (the input alone), "embed" or "reconstruct"."""
        start, stop = self.store.split_range(split)
        stop = min(stop, start + limit) if limit > 0 else stop
        batches = tqdm(sequential_batches(self.store, start, stop, self.settings.batch_size),
                       total=-(-(stop - start) // self.settings.batch_size), unit="batch", leave=False,
                       desc=f"{'read' if mode == 'prepare' else 'embed'} {split} cells",
                       disable=None if jax.process_index() == 0 else True)
        for batch, n_valid in batches:
            if mode == "reconstruct":
                key = jax.random.fold_in(self.key, int(batch["cell"][0]))  # masks depend on the cells only
                out = self._embed_and_reconstruct(self.params, batch, self.table, key)
            elif mode == "embed":
                out = self._embed(self.params, batch, self.table)
            else:
                out = self._prepare(batch, self.table)
            yield batch, n_valid, jax.device_get(out)

    def _cell_batches(self, split: str, limit: int):
        for _, n, out in self._batches(split, limit, "prepare"):
            yield CellBatch(out["x"][:n], out["counts"][:n])

    def _fit(self, baseline: Baseline) -> Fitted | None:
        """`baseline` fitted (on first use), or None when it is skipped here."""
        if baseline.name not in self.fitted and baseline.label not in self.skipped:
            primary = jax.process_index() == 0
            if primary:
                print(f"eval: fitting baseline {baseline.label} ...", end="", flush=True)
            try:
                self.fitted[baseline.name] = baseline.fit(self.fit_data)
            except Skipped as why:
                self.skipped[baseline.label] = str(why)
            if primary:
                fitted = self.fitted.get(baseline.name)
                print(f" {fitted.fit_seconds:.1f} s" if fitted else " skipped", flush=True)
        return self.fitted.get(baseline.name)

    @property
    def baseline_methods(self) -> dict[str, str]:
        """name -> method (its rows' name) of the baselines that ran, in `eval.baselines` order."""
        return {b.name: self.ran[b.name].method for b in self.baselines if b.name in self.ran}

    def cells(self, split: str, limit: int, reconstructions: Reconstructions | None = None) -> Cells:
        """Embeddings (model and baselines) and labels of the first `limit` cells of `split` (0: all);
        with `reconstructions` (and a model that reconstructs), their reconstruction scores too."""
        reconstruct = reconstructions is not None and self.reconstruct
        cached = {b.name: self.cache.read(b, split, limit, reconstruct) if self.cache and b.cached else None
                  for b in self.baselines}
        fresh = {b.name: (b, fitted) for b in self.baselines if cached[b.name] is None
                 and (fitted := self._fit(b)) is not None}
        model, labels, embedded = [], {name: [] for name in LABELS}, {name: [] for name in fresh}
        reconstructing = [(b, fitted) for b, fitted in fresh.values() if b.reconstructs] if reconstruct else []
        for batch, n, out in self._batches(split, limit, "reconstruct" if reconstruct else "embed"):
            x = out["x"][:n]
            model.append(out["z"][:n])
            for name, values in labels.items():
                values.append(batch[name][:n])
            cells = CellBatch(x, out["counts"][:n])
            for name, (_, fitted) in fresh.items():
                embedded[name].append(fitted.embed(cells))
            if reconstruct:
                hidden, measured = out["hidden"][:n], out["measured"][:n]
                reconstructions.update(self.method, "all", x, out["x_hat"][:n], measured)
                reconstructions.update(self.method, "masked", x, out["x_hat_masked"][:n], hidden)
                if reconstructing:  # else (e.g. PCA read from the cache) no masked input is needed
                    masked_input = np.asarray(mask_input(x, hidden, self.settings.mask_rate))
                for _, fitted in reconstructing:
                    reconstructions.update(fitted.method, "all", x, fitted.reconstruct(x), measured)
                    reconstructions.update(fitted.method, "masked", x, fitted.reconstruct(masked_input), hidden)
        if not labels["cell_type"]:
            raise SscellError(f"the store has no {split} cells to evaluate; convert it with a {split} split")
        for name, (baseline, fitted) in fresh.items():
            recon = reconstructions.columns(fitted.method) if reconstruct and baseline.reconstructs else {}
            embedding = getattr(fitted, "finish", np.concatenate)(embedded[name])
            cached[name] = BaselineRun(fitted.method, fitted.fit_seconds, embedding, recon)
            if self.cache and baseline.cached:
                self.cache.write(baseline, split, limit, reconstruct, cached[name])
        self.ran = {name: dataclasses.replace(run, fit_seconds=self.fit_seconds.setdefault(name, run.fit_seconds))
                    for name, run in cached.items() if run is not None}  # a split cached, another fitted anew
        if reconstruct:
            reconstructions.known.update({r.method: r.recon for name, r in self.ran.items() if name not in fresh
                                          and r.recon})
        return Cells({self.method: np.concatenate(model), **{r.method: r.embedding for r in self.ran.values()}},
                     {k: np.concatenate(v) for k, v in labels.items()})
