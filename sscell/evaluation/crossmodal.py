"""Cross-modality prediction: a cell's protein counts (or ATAC peaks) from its RNA, fine-tuned
from a pretrained encoder vs from scratch vs ridge regression, scored in and out of distribution.

    python -m sscell.evaluation.crossmodal --workdir=PRETRAINED_RUN [--store=STORE]
        [--config=experiments/crossmodal_cpu.py] [--fractions=0.1,1] [--steps=N] [--seed=SEED]

STORE (default: the pretrained run's own store) holds obsm['protein_counts'] (sscell.data.modality)
and the pretrained run's genes. For each fraction of the train cells of the config's
`data.train_datasets` (all datasets if empty), two `protein_regression` runs (the pretrained
architecture + a regression head with the batch one-hot, MSE on log1p protein counts, every
layer trained, the config's optimiser) train for the same steps: one from the pretrained
encoder, one from scratch. Each is an ordinary resumable sscell run in
PRETRAINED_RUN/crossmodal/<arm>_<fraction>/. A ridge regression (scikit-learn RidgeCV, alpha by
efficient leave-one-out) on the same cells' log1p-normalised RNA plus the batch one-hot is the
linear baseline. All three are scored on the test cells of those datasets (`id_*`) and on every
cell of the other datasets, batches never trained on (`ood_*`): Pearson and Spearman per cell
(mean over cells; `*_pearson_cell` is the study's headline), per protein and over all entries,
and MSE of log1p counts. Written to PRETRAINED_RUN/crossmodal.{md,csv} (and each protein's Pearson
correlation across cells to crossmodal_per_protein.{md,csv}) and bars_crossmodal.png.

With `loss.name = "atac_regression"` and `data.modality = "atac_counts"` (e.g.
experiments/crossmodal_atac_cpu.py) the same runs predict a cell's peaks: the targets are the
TF-IDF of its peak counts (`sscell.losses.crossmodal.tfidf`, IDF of the in-distribution train
split, shared by every fraction and arm), the arms live in PRETRAINED_RUN/crossmodal_atac/ and the
results in crossmodal_atac.{md,csv}, crossmodal_atac_per_peak.{md,csv}, bars_crossmodal_atac.png.
Targets are scored dense (cells x peaks in memory): fine for thousands of peaks; subset a
whole-genome peak set first (`python -m sscell.data.split_features --top-features`).
"""
from __future__ import annotations

import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
import pandas as pd
from absl import app, flags, logging
from ml_collections import config_flags
from sklearn.linear_model import RidgeCV

from sscell.bundle import is_bundle
from sscell.config import default_config
from sscell.data.loader import label_codes, row_batches, select_rows
from sscell.data.modality import ATAC_KEY, PROTEIN_KEY, ModalityReader, SparseModalityReader, open_modality
from sscell.data.prepare import store_path
from sscell.data.store import Store, open_store, runs
from sscell.data.task_data import TaskInfo, inverse_document_frequency
from sscell.errors import SscellError, exit_on_error
from sscell.evaluation.figures import plot_bars
from sscell.evaluation.finetune import ARMS, arm_config, finetune_config, label_fractions, run_settings
from sscell.evaluation.metrics import correlation_scores, pearson_rows
from sscell.evaluation.report import write_results
from sscell.evaluation.run import open_run
from sscell.losses.crossmodal import tfidf
from sscell.training.state import check_same_genes
from sscell.training.step import task_batch
from sscell.training.workdir_run import train_in_workdir

RESULTS = "crossmodal"  # PRETRAINED_RUN/crossmodal.{md,csv} and the arms' folder PRETRAINED_RUN/crossmodal/
RIDGE_ALPHAS = np.logspace(-1, 4, 6)
BAR_COLUMNS = ("id_pearson_cell", "ood_pearson_cell", "id_pearson_feature", "ood_pearson_feature")


def crossmodal_config(modality: str = PROTEIN_KEY) -> ml_collections.ConfigDict:
    """The study's fine-tuning settings (`finetune_config`) for the protein_regression task, or
    atac_regression with `modality` = ATAC_KEY."""
    config = finetune_config()
    config.loss.name = "atac_regression" if modality == ATAC_KEY else "protein_regression"
    config.data.modality = modality
    return config


CPU_IN_DISTRIBUTION = ("dataset_0", "dataset_1", "dataset_2")  # the CPU configs hold out dataset_3


def cpu_study_config(mode: str, modality: str, **synthetic) -> ml_collections.ConfigDict:
    """The CPU-scale study of experiments/crossmodal_*cpu.py: with `mode` "pretrain", masked
    pretraining (quickstart settings) on the RNA of datasets 0-2 of a generated 20,000-cell atlas
    carrying the second modality `synthetic` asks for (e.g. n_proteins=50); otherwise the
    regression arms' settings for `modality` (1,000 steps of 256 cells). Computed in float32,
    as the README's figures were measured ("auto": bfloat16 on AMX CPUs, faster)."""
    if mode == "pretrain":
        config = default_config()
        config.data.synthetic.update(n_cells=20_000, **synthetic)
        config.data.train_datasets = CPU_IN_DISTRIBUTION
        config.model.hidden = (256, 256, 128, 128)  # the quickstart's
        config.model.dtype = "float32"
        config.train.update(steps=4_000, batch_size=256, log_every=25, val_every=250, checkpoint_every=250,
                            lr_decay_epochs=10)
        config.eval.tasks = ("knn", "crossmodal", "crossmodal_atac")  # and the tables of the regression arms
        return config
    config = crossmodal_config(modality)
    config.model.dtype = "float32"
    config.data.train_datasets = CPU_IN_DISTRIBUTION
    config.train.update(steps=1_000, batch_size=256, log_every=50, val_every=100, checkpoint_every=100,
                        val_batches=4)
    config.eval.batch_size = 1024
    return config


def evaluation_rows(store: Store, datasets: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Sorted store rows scored: "id", the test cells of `datasets` (all if empty), and "ood",
    every cell of the store's other datasets (absent when there are none)."""
    codes = label_codes(store, 0, store.n_cells)["dataset"]
    start, stop = store.split_range("test")
    in_test = {store.datasets[c] for c in np.unique(codes[start:stop])}
    if datasets and not in_test & set(datasets):
        raise SscellError(f"none of the in-distribution datasets ({', '.join(datasets)}) has test cells; choose "
                          f"data.train_datasets among {', '.join(sorted(in_test))}")
    sets = {"id": select_rows(store, "test", datasets=tuple(d for d in datasets if d in in_test))}
    other = [i for i, name in enumerate(store.datasets) if datasets and name not in datasets]
    if other:
        sets["ood"] = np.flatnonzero(np.isin(codes, other)).astype(np.int64)
    return sets


def modality_targets(reader: ModalityReader | SparseModalityReader, rows: np.ndarray, idf: np.ndarray | None
                     ) -> np.ndarray:
    """What the regression predicts for store `rows`: log1p protein counts, or the TF-IDF (with
    `idf`) of a sparse modality's peaks; float32 cells x features."""
    values = reader.read(runs(rows))
    if isinstance(reader, SparseModalityReader):
        return np.asarray(jax.jit(tfidf)(values, idf), np.float32)
    return np.log1p(values)


def _collect(store: Store, rows: np.ndarray, batch_size: int, fn: Callable[[dict], np.ndarray]) -> np.ndarray:
    """fn(batch)'s rows (cells x k) over `rows`, read `batch_size` cells at a time, in order."""
    parts = [np.asarray(fn(batch))[:n_valid] for batch, n_valid in row_batches(store, rows, batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def ridge_predictions(store: Store, measured: np.ndarray, train_rows: np.ndarray, sets: dict[str, np.ndarray],
                      batch_size: int, max_cells: int, seed: int, reader: ModalityReader | SparseModalityReader,
                      idf: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Predicted targets (`modality_targets`) of each set's rows by RidgeCV on the log1p-normalised
    RNA (the model's input) and the batch one-hot of at most `max_cells` of `train_rows` (seeded)."""
    n_genes, n_batches = store.n_genes, len(measured)
    x_of = jax.jit(lambda batch: task_batch(batch, n_genes, measured)["x"])

    def features(batch: dict) -> np.ndarray:
        return np.concatenate([np.asarray(x_of(batch)), np.eye(n_batches, dtype=np.float32)[batch["dataset"]]], 1)

    if len(train_rows) > max_cells:
        train_rows = np.sort(np.random.default_rng(seed).choice(train_rows, max_cells, replace=False))
    targets = modality_targets(reader, train_rows, idf)
    ridge = RidgeCV(alphas=RIDGE_ALPHAS).fit(_collect(store, train_rows, batch_size, features), targets)
    return {name: _collect(store, rows, batch_size, lambda b: ridge.predict(features(b))) for name, rows in sets.items()}


def model_predictions(run: str, config: ml_collections.ConfigDict, store: Store, sets: dict[str, np.ndarray],
                      batch_size: int) -> dict[str, np.ndarray]:
    """Predicted targets (`modality_targets`) of each set's rows by the trained run in `run`."""
    trained = open_run(run, config.eval.checkpoint, store=store)
    model, params, measured = trained.model, trained.params, trained.info.measured_table()

    @jax.jit
    def predict(batch):
        return model.apply({"params": params}, task_batch(batch, store.n_genes, measured)["x"], batch["dataset"])

    return {name: _collect(store, rows, batch_size, predict) for name, rows in sets.items()}


def crossmodal(workdir: str, target_store: str | None = None, fractions: list[float] = (1.0,), *,
               steps: int | None = None, seed: int | None = None,
               base: ml_collections.ConfigDict | None = None) -> list[dict]:
    """Train both arms per fraction on `target_store` (default: run `workdir`'s store), fit the
    ridge baseline, score all on the ID test cells and the OOD datasets, write
    `workdir`/crossmodal.{md,csv}; returns the result rows ([] if preempted: rerun to resume).

    `base` holds the settings (default `crossmodal_config()`): its `data.train_datasets` are the
    in-distribution datasets, `train.steps` (or `steps`) every run's length. `seed` (default:
    the pretrained run's) seeds the heads, the batch order and the fraction draw.
    """
    if is_bundle(workdir):  # it would write into the bundle, and has no store of its own
        raise SscellError(f"{workdir} is a bundle; cross-modality transfer starts from a run's workdir "
                          "(python -m sscell.evaluation.finetune --workdir=BUNDLE --outdir=DIR fine-tunes from one)")
    base, pretrained, seed = run_settings(workdir, base or crossmodal_config(), steps, fractions, seed)
    store = open_store(target_store or store_path(pretrained, workdir))
    check_same_genes(store_path(pretrained, workdir), store, workdir)
    reader = open_modality(store, base.data.modality)
    datasets = tuple(base.data.train_datasets)
    sparse = isinstance(reader, SparseModalityReader)
    idf = inverse_document_frequency(store, reader, datasets) if sparse else None
    results, feature = (f"{RESULTS}_{base.data.modality.removesuffix('_counts')}", "peak") if sparse else (
        RESULTS, "protein")
    sets = evaluation_rows(store, datasets)
    targets = {name: modality_targets(reader, rows, idf) for name, rows in sets.items()}
    batch_size = base.eval.batch_size
    names = {"pretrained": f"fine-tuned from sscell {pretrained.loss.name}", "scratch": "trained from scratch",
             "ridge": "ridge regression"}

    rows, per_feature = [], {feature: list(reader.names)}
    for fraction in fractions:
        predictions, cells = {}, select_rows(store, "train", datasets=datasets, fraction=fraction, seed=seed)
        for arm in ARMS:
            config = arm_config(base, workdir, store, arm, fraction, datasets, seed)
            config.loss.name = base.loss.name  # arm_config sets the classifier's
            run = os.path.join(workdir, results, f"{arm}_{fraction:g}")
            if not train_in_workdir(config, run, store):
                print(f"{run} stopped early (preempted); rerun the same command to resume")
                return []
            predictions[arm] = model_predictions(run, config, store, sets, batch_size)
        measured = TaskInfo(n_genes=store.n_genes, measured=np.asarray(store.measured, bool)).measured_table()
        predictions["ridge"] = ridge_predictions(store, measured, cells, sets, batch_size, base.eval.probe_cells, seed,
                                                 reader, idf)
        for method, predicted in predictions.items():
            row = {"method": names[method], "label_fraction": fraction, "train_cells": len(cells),
                   "steps": base.train.steps if method in ARMS else None}
            scores = {name: correlation_scores(targets[name], predicted[name]) for name in sets}
            row.update({f"{name}_pearson_cell": scores[name]["pearson_cell"] for name in sets})  # the headline first
            row.update({f"{name}_{k}": v for name in sets for k, v in scores[name].items() if k != "pearson_cell"})
            rows.append(row)
            per_feature.update({f"{name}: {names[method]} ({fraction:g})": pearson_rows(targets[name].T,
                                                                                       predicted[name].T)
                                for name in sets})
    if jax.process_index() == 0:
        table = write_results(rows, workdir, results)
        write_results(pd.DataFrame(per_feature).to_dict("records"), workdir, f"{results}_per_{feature}")
        labelled = [{**r, "method": f"{r['method']} ({r['label_fraction']:g})"} for r in rows]
        plot_bars(labelled if len(fractions) > 1 else rows, BAR_COLUMNS, "cross-modality prediction",
                  os.path.join(workdir, f"bars_{results}.png"))
        ood = f", {len(sets['ood'])} cells of held-out datasets (ood)" if "ood" in sets else ""
        print(f"\nCross-modality prediction of {reader.n_features} {feature}s in {store.path}: {len(sets['id'])} test "
              f"cells (id){ood}; {base.eval.checkpoint} checkpoints\n\n{table}\nwritten to {workdir}/{results}.md, "
              f"{results}.csv, {results}_per_{feature}.csv/.md, bars_{results}.png")
    return rows


def cli() -> None:
    """The command (its flags are defined here, so importing this module defines none)."""
    config = config_flags.DEFINE_config_file("config", None, "Settings (default: crossmodal_config()), e.g. "
                                             "experiments/crossmodal_cpu.py.", lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "Work directory of the pretrained run.")
    store = flags.DEFINE_string("store", None, "Store with obsm['protein_counts'] and the pretrained run's genes "
                                "(default: the pretrained run's store).")
    fractions = flags.DEFINE_list("fractions", ["1"], "Fractions of the in-distribution train cells.")
    steps = flags.DEFINE_integer("steps", None, "Training steps of every run (default: the config's train.steps).")
    seed = flags.DEFINE_integer("seed", None, "Seed of the heads, batch order and fraction draw (default: the "
                                "pretrained run's).")
    flags.mark_flags_as_required(["workdir"])

    def main(argv: list[str]) -> None:
        del argv
        logging.set_verbosity(logging.WARNING)
        with exit_on_error():
            crossmodal(workdir.value, store.value, label_fractions(fractions.value), steps=steps.value, seed=seed.value,
                       base=config.value)

    app.run(main)


if __name__ == "__main__":
    cli()
