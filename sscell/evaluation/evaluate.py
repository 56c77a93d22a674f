"""Evaluate a run from its workdir alone: `python -m sscell.evaluation --workdir=runs/quickstart [--tasks=knn,umap]`.

The best (lowest validation loss; or the latest, `eval.checkpoint`) checkpoint embeds the
validation and test cells (and, for the linear probe, a sample of training cells); two
baselines embed the same cells: PCA of log1p-normalised counts and PCA of the highly variable
genes' (both fitted on validation cells). Each selected task (`eval.tasks`) then scores every
method on the same cells:

- knn: zero-shot cell typing, k nearest reference cells vote for each test cell (no self
  neighbour: the sets are disjoint). The reference (`eval.knn_reference`) is the validation
  cells (the study's protocol), the first `eval.knn_reference_cells` training cells (a random
  sample: the store keeps each split in a seeded random order), or both; it is printed and
  recorded in the results (`knn_reference`, `knn_reference_cells`). Macro F1 (headline,
  docs/metrics.md), micro F1, per-class F1, and, when the store holds Cell Ontology ids,
  ontology-aware F1 (predicting a descendant of the true type counts as correct);
- linear_probe: logistic regression on frozen embeddings (`sscell.evaluation.probe`);
- reconstruction: explained variance and MSE of the test cells' log1p expression, on every
  measured gene and on a seeded random `eval.mask_rate` of them hidden from the input (scored
  on the hidden genes only); unmeasured genes are never scored. PCA reconstructs by projecting
  back to genes;
- integration: scib-metrics bio conservation and batch correction with batch = donor and
  batch = dataset (`sscell.evaluation.integration`), on a seeded sample of `eval.integration_cells`
  held-out (validation and test) cells, so that several donors take part;
- umap: UMAP of each method's embedding of `eval.umap_cells` held-out cells, coloured by cell
  type and by batch (dataset, or donor when there is one dataset).

Writes into the workdir: results.{csv,md} (one row per method; fine-tuning rows from
`python -m sscell.evaluation.finetune` appended), per_class_f1.{csv,md},
integration.{csv,md}, umap_cell_type.png, umap_batch.png, bars_<task>.png and loss_curve.png.
"""
from __future__ import annotations

import dataclasses
import os
import time

import jax
import ml_collections
import numpy as np
import pandas as pd
import scipy.sparse as sp

from sscell.config import default_config, load_config
from sscell.data.loader import label_names, sequential_batches
from sscell.data.genes import highly_variable_genes
from sscell.data.prepare import store_path
from sscell.data.store import Store, open_store
from sscell.errors import SscellError
from sscell.evaluation.figures import plot_bars, plot_maps, umap_2d
from sscell.evaluation.integration import AGGREGATES, integration_scores
from sscell.evaluation.metrics import (
    ExplainedVariance,
    f1_columns,
    fit_pca,
    per_class_f1,
)
from sscell.evaluation.neighbors import knn_predict
from sscell.evaluation.ontology import store_descendants
from sscell.evaluation.probe import linear_probe
from sscell.evaluation.report import plot_loss_curves, read_results, write_results
from sscell.losses.masking import mask_input, random_gene_mask
from sscell.training.restore import load_params
from sscell.training.state import check_same_genes
from sscell.training.step import task_batch
from sscell.training.train import Setup

__all__ = ["TASKS", "evaluate", "load_params"]

TASKS = ("knn", "linear_probe", "reconstruction", "integration", "umap")
KNN_REFERENCES = ("val", "train", "train+val")  # eval.knn_reference: the splits whose cells vote
DOWNSTREAM_RESULTS = ("finetune", "crossmodal", "crossmodal_atac")  # tables the finetune / crossmodal commands write
SPLIT_NAMES = {"train": "training", "val": "validation"}
BATCHES = {"donor": "donor", "dataset": "dataset"}  # integration batch keys -> loader label names
BAR_COLUMNS = {
    "knn": ("knn_macro_f1", "knn_micro_f1", "knn_macro_f1_ontology"),
    "linear_probe": ("probe_macro_f1", "probe_micro_f1", "probe_macro_f1_ontology"),
    "reconstruction": ("recon_ev_weighted", "recon_ev_uniform", "recon_masked_ev_weighted", "recon_masked_ev_uniform"),
    "integration": tuple(f"scib_{b}_{a}" for b in BATCHES for a in ("bio", "batch", "total")),
}


def eval_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run's `eval` section over today's defaults (a run saved before a field existed gets its default)."""
    settings = default_config().eval
    settings.update(config.eval.to_dict())
    return settings


def selected_tasks(tasks) -> tuple[str, ...]:
    """`tasks` (names or a comma-separated string) checked against TASKS."""
    names = tuple(t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip())
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise SscellError(f"unknown evaluation task(s) {', '.join(unknown) or '(none given)'}; choose from "
                          f"{', '.join(TASKS)} (eval.tasks or --tasks)")
    return names


def knn_reference_splits(reference: str) -> tuple[str, ...]:
    """The splits `reference` (one of KNN_REFERENCES) takes its cells from, training first."""
    if reference not in KNN_REFERENCES:
        raise SscellError(f"unknown kNN reference {reference!r}; choose from {', '.join(KNN_REFERENCES)} "
                          "(eval.knn_reference or --knn_reference)")
    return tuple(reference.split("+"))


def _train_cells_needed(tasks: tuple[str, ...], settings) -> int | None:
    """How many training cells to embed (0: all; None: none): enough for the probe and the kNN reference."""
    limits = []
    if "linear_probe" in tasks:
        limits.append(settings.probe_cells)
    if "knn" in tasks and "train" in knn_reference_splits(settings.knn_reference):
        limits.append(settings.knn_reference_cells)
    if not limits:
        return None
    return 0 if 0 in limits else max(limits)


class Baselines:
    """PCA(n) of log1p counts and PCA(n) of the `hvg_genes` most variable genes, fitted on `fit_x`."""

    def __init__(self, fit_x: sp.csr_matrix, n_components: int, hvg_genes: int, seed: int):
        self.pca = fit_pca(fit_x, n_components, seed)
        self.hvg = highly_variable_genes(fit_x, hvg_genes)
        self.hvg_pca = fit_pca(fit_x[:, self.hvg], n_components, seed)
        self.pca_name = f"PCA({self.pca.n_components_}) log1p"
        self.hvg_name = f"PCA({self.hvg_pca.n_components_}) HVG({len(self.hvg)})"

    def embed(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {self.pca_name: self.pca.transform(x).astype(np.float32),
                self.hvg_name: self.hvg_pca.transform(x[:, self.hvg]).astype(np.float32)}

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        return self.pca.inverse_transform(self.pca.transform(x))


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
    """Explained variance accumulators: (method, "all" | "masked") -> ExplainedVariance."""

    def __init__(self):
        self.scores: dict[tuple[str, str], ExplainedVariance] = {}

    def update(self, method: str, which: str, x, x_hat, mask) -> None:
        self.scores.setdefault((method, which), ExplainedVariance()).update(x, x_hat, mask)

    def columns(self, method: str) -> dict[str, float]:
        return {f"recon_{'' if which == 'all' else 'masked_'}{k}": v
                for (m, which), ev in self.scores.items() if m == method for k, v in ev.result().items()}


class Evaluator:
    """Embeds a store's splits with a run's parameters and the baselines, batch by batch."""

    def __init__(self, setup: Setup, params, store: Store, settings, seed: int, method: str, reconstruct: bool):
        self.params, self.store, self.settings, self.method = params, store, settings, method
        self.table = store.measured if len(store.measured) else np.ones((1, store.n_genes), bool)
        self.key = jax.random.key(seed)
        model, n_genes, rate = setup.model, setup.info.n_genes, settings.mask_rate

        @jax.jit
        def forward(params, batch, table, key):
            view = task_batch(batch, n_genes, table)  # the model's training-time input
            x, measured = view["x"], view["measured"]
            out = {"x": x, "z": model.apply({"params": params}, x, method="encode")}
            if reconstruct:
                hidden = random_gene_mask(key, x.shape, rate) & measured
                out.update(measured=measured, hidden=hidden,
                           x_hat=model.apply({"params": params}, x, measured, method="reconstruct"),
                           x_hat_masked=model.apply({"params": params}, mask_input(x, hidden, rate), measured,
                                                    method="reconstruct"))
            return out

        self.forward = forward
        self.baselines: Baselines | None = None

    def _batches(self, split: str, limit: int):
        start, stop = self.store.split_range(split)
        stop = min(stop, start + limit) if limit > 0 else stop
        for batch, n_valid in sequential_batches(self.store, start, stop, self.settings.batch_size):
            key = jax.random.fold_in(self.key, int(batch["cell"][0]))  # masks depend on the cells only
            yield batch, n_valid, jax.device_get(self.forward(self.params, batch, self.table, key))

    def fit_baselines(self, seed: int) -> None:
        """Fit the baselines on the first `eval.baseline_cells` validation cells."""
        parts = [sp.csr_matrix(out["x"][:n]) for _, n, out in self._batches("val", self.settings.baseline_cells)]
        self.baselines = Baselines(sp.vstack(parts, format="csr"), self.settings.pca_components,
                                   self.settings.hvg_genes, seed)

    def cells(self, split: str, limit: int, reconstructions: Reconstructions | None = None) -> Cells:
        """Embeddings (model and baselines) and labels of the first `limit` cells of `split` (0: all)."""
        parts: dict[str, list] = {}
        labels: dict[str, list] = {name: [] for name in ("cell_type", "donor", "dataset")}
        for batch, n, out in self._batches(split, limit):
            x = out["x"][:n]
            embeddings = {self.method: out["z"][:n], **self.baselines.embed(x)}
            for name, e in embeddings.items():
                parts.setdefault(name, []).append(e)
            for name, values in labels.items():
                values.append(batch[name][:n])
            if reconstructions is not None:
                masked_input = np.asarray(mask_input(x, out["hidden"][:n], self.settings.mask_rate))
                for method, all_genes, hidden_genes in (
                        (self.method, out["x_hat"][:n], out["x_hat_masked"][:n]),
                        (self.baselines.pca_name, self.baselines.reconstruct(x),
                         self.baselines.reconstruct(masked_input))):
                    reconstructions.update(method, "all", x, all_genes, out["measured"][:n])
                    reconstructions.update(method, "masked", x, hidden_genes, out["hidden"][:n])
        if not labels["cell_type"]:
            raise SscellError(f"the store has no {split} cells to evaluate; convert it with a {split} split")
        return Cells({k: np.concatenate(v) for k, v in parts.items()},
                     {k: np.concatenate(v) for k, v in labels.items()})


@dataclasses.dataclass
class Outcome:
    """What the tasks produce: result columns per method, per-class F1 columns, extra tables, notes."""

    rows: dict[str, dict]
    per_class: dict[str, pd.Series] = dataclasses.field(default_factory=dict)
    tables: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    files: list[str] = dataclasses.field(default_factory=list)

    def score(self, task: str, method: str, true: np.ndarray, pred: np.ndarray, type_names: list[str],
              descendants: dict | None) -> None:
        """F1 columns (`f1_columns`: `{task}_macro_f1`, ... + `_ontology`) and per-class F1."""
        self.rows[method].update(f1_columns(task, true, pred, descendants))
        table = per_class_f1(true, pred)
        table.index = [type_names[c] for c in table.index]
        self.per_class.setdefault("test_cells", table["support"])
        self.per_class[f"{task}: {method}"] = table["f1"]


def evaluate(workdir: str, tasks=None, store: str | None = None, outdir: str | None = None,
             knn_reference: str | None = None) -> list[dict]:
    """Run the evaluation tasks (default `eval.tasks`) on `workdir`'s `eval.checkpoint` checkpoint;
    returns the result rows (the model's first). `knn_reference` overrides `eval.knn_reference`.

    `store` evaluates the cells of another store with the run's gene vocabulary (e.g. a
    transfer target) instead of the run's own; outputs go to `outdir` (default: the workdir).
    Fine-tuning rows are appended only when the run's own store is evaluated.
    """
    config = load_config(workdir)
    settings = eval_settings(config)
    tasks = selected_tasks(settings.tasks if tasks is None else tasks)
    if knn_reference is not None:
        settings.knn_reference = knn_reference
    reference_splits = knn_reference_splits(settings.knn_reference)
    run_store = open_store(store_path(config, workdir))
    setup, params, step = load_params(workdir, config, run_store)
    if store is None:
        store = run_store
    else:
        store = open_store(store)
        check_same_genes(run_store.path, store, workdir)
    outdir = outdir or workdir
    os.makedirs(outdir, exist_ok=True)
    method = f"sscell {config.loss.name} (step {step})"
    reconstruct = "reconstruction" in tasks and hasattr(setup.model, "reconstruct")  # tasks without a decoder: none
    evaluator = Evaluator(setup, params, store, settings, config.seed, method, reconstruct)
    started = time.perf_counter()
    evaluator.fit_baselines(config.seed)
    reconstructions = Reconstructions() if reconstruct else None
    val = evaluator.cells("val", settings.max_cells)
    test = evaluator.cells("test", settings.max_cells, reconstructions)
    train_cells = _train_cells_needed(tasks, settings)
    train = evaluator.cells("train", train_cells) if train_cells is not None else None
    type_names = label_names(store, "cell_type")
    descendants = store_descendants(store) if {"knn", "linear_probe"} & set(tasks) else None
    methods = list(test.embeddings)
    outcome = Outcome({m: {"method": m} for m in methods})

    knn_described = ""
    if "knn" in tasks:
        parts = {s: train.first(settings.knn_reference_cells) if s == "train" else val for s in reference_splits}
        reference = Cells.concat(list(parts.values()))
        for m in methods:
            predicted = knn_predict(reference.embeddings[m], reference.labels["cell_type"], test.embeddings[m],
                                    settings.knn_k, settings.knn_method)
            outcome.score("knn", m, test.labels["cell_type"], predicted, type_names, descendants)
            outcome.rows[m].update(knn_reference=settings.knn_reference, knn_reference_cells=len(reference))
        knn_described = (f"Zero-shot kNN (k={settings.knn_k}): reference = "
                         + " + ".join(f"{len(c)} {SPLIT_NAMES[s]} cells" for s, c in parts.items())
                         + f" (eval.knn_reference={settings.knn_reference}), query = {len(test)} test cells, ")
    if "linear_probe" in tasks:
        probe_train = train.first(settings.probe_cells)
        for m in methods:
            predicted, c = linear_probe(probe_train.embeddings[m], probe_train.labels["cell_type"], val.embeddings[m],
                                        val.labels["cell_type"], test.embeddings[m], seed=config.seed)
            outcome.score("probe", m, test.labels["cell_type"], predicted, type_names, descendants)
            outcome.rows[m]["probe_C"] = c
    if reconstructions is not None:
        for m in methods:
            outcome.rows[m].update(reconstructions.columns(m))
    elif "reconstruction" in tasks:
        outcome.notes.append(f"reconstruction: skipped, the {config.loss.name} model has no decoder")
    if "integration" in tasks:
        _integration(Cells.held_out(val, test, settings.integration_cells, config.seed),
                     evaluator.baselines.pca_name, settings, outcome)
    if "umap" in tasks and jax.process_index() == 0:
        _umap(Cells.held_out(val, test, settings.umap_cells, config.seed), store, type_names, config.seed,
              settings.knn_method, outdir, outcome)

    rows = list(outcome.rows.values())
    if store is run_store:  # what the fine-tuning and cross-modality commands wrote into the workdir
        rows += [r for name in DOWNSTREAM_RESULTS for r in read_results(workdir, name)]
    if jax.process_index() != 0:  # every process computes (params are global arrays), one writes
        return rows
    table = write_results(rows, outdir)
    _write(outdir, workdir, tasks, outcome)
    probe = f"; linear probe fit on {len(probe_train)} training cells" if "linear_probe" in tasks else ""
    ontology = "; ontology-aware F1 with the Cell Ontology" if descendants is not None else ""
    recon = (f"; reconstruction on test cells (masked: {settings.mask_rate:.0%} of measured genes hidden)"
             if reconstruct else "")
    print(f"\nEvaluated {', '.join(tasks)} in {time.perf_counter() - started:.0f} s. "
          f"{knn_described}{len(type_names)} cell types"
          f"{probe}{ontology}{recon}\n\n{table}" + "".join(f"\n{note}" for note in outcome.notes)
          + f"\nwritten to {outdir}: results.md, results.csv, {', '.join(outcome.files)}")
    return rows


def _integration(cells: Cells, unintegrated: str, settings, outcome: Outcome) -> None:
    """scib-metrics scores per batch key: totals into the result rows, every metric into integration.csv."""
    done: dict[bytes, pd.DataFrame] = {}  # batch partition -> its scores (donor and dataset may coincide)
    for batch, label in BATCHES.items():
        partition = pd.factorize(cells.labels[label])[0]
        if partition.max() < 1:
            outcome.notes.append(f"integration with batch = {batch}: skipped, the held-out cells hold one {batch}")
            continue
        if partition.tobytes() not in done:
            done[partition.tobytes()] = integration_scores(
                cells.embeddings, cells.labels["cell_type"], partition, unintegrated, kbet=settings.integration_kbet,
                knn_method=settings.knn_method)
        for m, values in done[partition.tobytes()].iterrows():
            outcome.rows[m].update({f"scib_{batch}_{key}": values[name] for key, name in
                                    zip(("bio", "batch", "total"), AGGREGATES)})
            outcome.tables.setdefault("integration", []).append(
                {"method": m, "batch": batch, "cells": len(cells), **values.to_dict()})


def _umap(cells: Cells, store: Store, type_names: list[str], seed: int, knn_method: str, outdir: str,
          outcome: Outcome) -> None:
    """UMAP figures of every method's embedding, coloured by cell type and by batch."""
    batch = "dataset" if len(np.unique(cells.labels["dataset"])) > 1 else "donor"
    coords = {m: umap_2d(e, seed, knn_method) for m, e in cells.embeddings.items()}
    plot_maps(coords, cells.labels["cell_type"], type_names, f"UMAP of {len(cells)} held-out cells: cell type",
              os.path.join(outdir, "umap_cell_type.png"))
    plot_maps(coords, cells.labels[batch], label_names(store, batch), f"UMAP of {len(cells)} held-out cells: {batch}",
              os.path.join(outdir, "umap_batch.png"))
    outcome.files += ["umap_cell_type.png", "umap_batch.png"]


def _write(outdir: str, workdir: str, tasks: tuple[str, ...], outcome: Outcome) -> None:
    """The side tables and figures into `outdir` (results.csv/md are written by the caller); the
    loss curves of the run in `workdir`."""
    if outcome.per_class:
        table = pd.DataFrame(outcome.per_class)
        table.index.name = "cell_type"
        write_results(table.reset_index().to_dict("records"), outdir, "per_class_f1")
        outcome.files.append("per_class_f1.csv/.md")
    for name, table_rows in outcome.tables.items():
        write_results(table_rows, outdir, name)
        outcome.files.append(f"{name}.csv/.md")
    for task, columns in BAR_COLUMNS.items():
        if task in tasks and any(c in row for row in outcome.rows.values() for c in columns):
            plot_bars(list(outcome.rows.values()), columns, task.replace("_", " "),
                      os.path.join(outdir, f"bars_{task}.png"))
            outcome.files.append(f"bars_{task}.png")
    metrics = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics):
        plot_loss_curves(metrics, os.path.join(outdir, "loss_curve.png"))
        outcome.files.append("loss_curve.png")
