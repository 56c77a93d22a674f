"""The evaluated cells: a run's embeddings of a store's splits, its reconstructions, and the PCA baselines'.

The baselines (PCA of log1p counts and PCA of the highly variable genes, fitted on validation
cells) do not depend on the checkpoint: their embeddings and reconstruction scores are cached
per store, split and settings (`BaselineCache`), so a rerun, or another checkpoint of the same
data, does not recompute them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import jax
import ml_collections
import numpy as np
import scipy.sparse as sp

from sscell.atomic import atomic_file
from sscell.data.genes import highly_variable_genes
from sscell.data.loader import sequential_batches
from sscell.data.store import Store, resolved_location
from sscell.errors import SscellError
from sscell.evaluation.metrics import ExplainedVariance, fit_pca
from sscell.evaluation.run import Run
from sscell.losses.masking import mask_input, random_gene_mask
from sscell.training.step import task_batch

LABELS = ("cell_type", "donor", "dataset")
CACHE_VERSION = 1  # bump when what the cache holds, or how it is computed, changes


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


class Baselines:
    """PCA(n) of log1p counts and PCA(n) of the `hvg_genes` most variable genes, fitted on `fit_x`."""

    def __init__(self, fit_x: sp.csr_matrix, n_components: int, hvg_genes: int, seed: int):
        self.pca = fit_pca(fit_x, n_components, seed)
        self.hvg = highly_variable_genes(fit_x, hvg_genes)
        # every gene highly variable (hvg_genes >= genes): the same PCA, not fitted twice
        self.hvg_pca = self.pca if len(self.hvg) == fit_x.shape[1] else fit_pca(fit_x[:, self.hvg], n_components, seed)
        self.pca_name = f"PCA({self.pca.n_components_}) log1p"
        self.hvg_name = f"PCA({self.hvg_pca.n_components_}) HVG({len(self.hvg)})"
        self.names = (self.pca_name, self.hvg_name)

    def embed(self, x: np.ndarray) -> dict[str, np.ndarray]:
        pca = self.pca.transform(x).astype(np.float32)
        hvg = pca if self.hvg_pca is self.pca else self.hvg_pca.transform(x[:, self.hvg]).astype(np.float32)
        return {self.pca_name: pca, self.hvg_name: hvg}

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        return self.pca.inverse_transform(self.pca.transform(x))


class BaselineCache:
    """The baselines' embeddings (and PCA's reconstruction scores) of one split's cells, in
    `folder`/baselines_<key>.npz: key = store location and format, split, cells and every
    setting they depend on. Written atomically, read without pickle; a file that cannot be
    read is recomputed."""

    def __init__(self, folder: str | os.PathLike, store: Store, settings: ml_collections.ConfigDict, seed: int):
        self.folder = Path(folder)
        root = Path(resolved_location(store.path))
        marker = root / "zarr.json"
        stamp = marker.stat().st_mtime_ns if marker.exists() else 0  # a store converted anew at the same path
        self.base = {"version": CACHE_VERSION, "store": str(root), "stamp": stamp, "cells": store.n_cells,
                     "genes": store.n_genes, "seed": seed,
                     **{k: settings[k] for k in ("pca_components", "hvg_genes", "baseline_cells", "batch_size",
                                                 "mask_rate")}}

    def path(self, split: str, limit: int, reconstruct: bool) -> Path:
        key = json.dumps({**self.base, "split": split, "limit": limit, "reconstruct": reconstruct}, sort_keys=True)
        return self.folder / f"baselines_{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"

    def read(self, split: str, limit: int, reconstruct: bool) -> tuple[dict[str, np.ndarray], dict[str, float]] | None:
        """(embeddings by method, PCA's reconstruction columns) or None when not cached."""
        try:
            with np.load(self.path(split, limit, reconstruct), allow_pickle=False) as saved:
                names = [str(n) for n in saved["names"]]
                embeddings = {name: saved[f"embedding_{i}"] for i, name in enumerate(names)}
                recon = dict(zip((str(k) for k in saved["recon_keys"]), saved["recon_values"].tolist()))
        except (OSError, KeyError, ValueError):
            return None
        return embeddings, recon

    def write(self, split: str, limit: int, reconstruct: bool, embeddings: dict[str, np.ndarray],
              recon: dict[str, float]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        arrays = {f"embedding_{i}": e for i, e in enumerate(embeddings.values())}
        arrays.update(names=np.asarray(list(embeddings), dtype=str), recon_keys=np.asarray(list(recon), dtype=str),
                      recon_values=np.asarray(list(recon.values()), np.float64))
        with atomic_file(self.path(split, limit, reconstruct)) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)  # a file object: np.savez would append .npz to a name


class Evaluator:
    """Embeds a store's splits with a run's parameters and the baselines, batch by batch.

    `reconstruct`: the test cells are also reconstructed, from all their genes and with a seeded
    `eval.mask_rate` of them hidden (`Reconstructions`)."""

    def __init__(self, run: Run, store: Store, settings, method: str, reconstruct: bool,
                 cache: BaselineCache | None = None):
        self.params, self.store, self.settings, self.method = run.params, store, settings, method
        self.reconstruct, self.cache = reconstruct, cache
        self.table = store.measured if len(store.measured) else np.ones((1, store.n_genes), bool)
        self.key = jax.random.key(run.config.seed)
        self.seed = run.config.seed
        model, n_genes, rate = run.model, run.store.n_genes, settings.mask_rate

        def inputs(batch, table):
            view = task_batch(batch, n_genes, table)  # the model's training-time input
            return view["x"], view["measured"]

        @jax.jit
        def embed(params, batch, table):
            x, _ = inputs(batch, table)
            return {"x": x, "z": model.apply({"params": params}, x, method="encode")}

        @jax.jit
        def embed_and_reconstruct(params, batch, table, key):
            x, measured = inputs(batch, table)
            hidden = random_gene_mask(key, x.shape, rate) & measured
            return {"x": x, "z": model.apply({"params": params}, x, method="encode"), "measured": measured,
                    "hidden": hidden, "x_hat": model.apply({"params": params}, x, measured, method="reconstruct"),
                    "x_hat_masked": model.apply({"params": params}, mask_input(x, hidden, rate), measured,
                                                method="reconstruct")}

        self._embed, self._embed_and_reconstruct = embed, embed_and_reconstruct
        self._baselines: Baselines | None = None
        self.baseline_names: tuple[str, ...] = ()  # PCA of log1p counts first, once `cells` ran

    def _batches(self, split: str, limit: int, reconstruct: bool):
        start, stop = self.store.split_range(split)
        stop = min(stop, start + limit) if limit > 0 else stop
        for batch, n_valid in sequential_batches(self.store, start, stop, self.settings.batch_size):
            if reconstruct:
                key = jax.random.fold_in(self.key, int(batch["cell"][0]))  # masks depend on the cells only
                out = self._embed_and_reconstruct(self.params, batch, self.table, key)
            else:
                out = self._embed(self.params, batch, self.table)
            yield batch, n_valid, jax.device_get(out)

    @property
    def baselines(self) -> Baselines:
        """The baselines, fitted on the first `eval.baseline_cells` validation cells (on first use)."""
        if self._baselines is None:
            parts = [sp.csr_matrix(out["x"][:n]) for _, n, out in self._batches("val", self.settings.baseline_cells,
                                                                                 False)]
            self._baselines = Baselines(sp.vstack(parts, format="csr"), self.settings.pca_components,
                                        self.settings.hvg_genes, self.seed)
        return self._baselines

    def cells(self, split: str, limit: int, reconstructions: Reconstructions | None = None) -> Cells:
        """Embeddings (model and baselines) and labels of the first `limit` cells of `split` (0: all);
        with `reconstructions` (and a model that reconstructs), their reconstruction scores too."""
        reconstruct = reconstructions is not None and self.reconstruct
        cached = self.cache.read(split, limit, reconstruct) if self.cache else None
        model, labels, baseline = [], {name: [] for name in LABELS}, {}
        for batch, n, out in self._batches(split, limit, reconstruct):
            x = out["x"][:n]
            model.append(out["z"][:n])
            for name, values in labels.items():
                values.append(batch[name][:n])
            if cached is None:
                for name, e in self.baselines.embed(x).items():
                    baseline.setdefault(name, []).append(e)
            if reconstruct:
                hidden = out["hidden"][:n]
                reconstructions.update(self.method, "all", x, out["x_hat"][:n], out["measured"][:n])
                reconstructions.update(self.method, "masked", x, out["x_hat_masked"][:n], hidden)
                if cached is None:
                    masked_input = np.asarray(mask_input(x, hidden, self.settings.mask_rate))
                    pca = self.baselines.pca_name
                    reconstructions.update(pca, "all", x, self.baselines.reconstruct(x), out["measured"][:n])
                    reconstructions.update(pca, "masked", x, self.baselines.reconstruct(masked_input), hidden)
        if not labels["cell_type"]:
            raise SscellError(f"the store has no {split} cells to evaluate; convert it with a {split} split")
        if cached is None:
            baseline = {k: np.concatenate(v) for k, v in baseline.items()}
            recon = reconstructions.columns(self.baselines.pca_name) if reconstruct else {}
            if self.cache:
                self.cache.write(split, limit, reconstruct, baseline, recon)
        else:
            baseline, recon = cached
        self.baseline_names = tuple(baseline)
        if cached is not None and reconstruct:
            reconstructions.known[self.baseline_names[0]] = recon
        return Cells({self.method: np.concatenate(model), **baseline},
                     {k: np.concatenate(v) for k, v in labels.items()})
