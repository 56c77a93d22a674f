"""Transfer evaluation: a classifier fine-tuned from a pretrained run's encoder vs the same model from scratch.

    python -m sscell.evaluation.finetune --workdir=PRETRAINED_RUN --store=TARGET_STORE [--dataset=DATASET_ID]
        [--fractions=0.01,0.1,1] [--steps=N] [--seed=SEED] [--config=experiments/finetune_cpu.py]
        [--config.train.batch_size=64 ...] [--outdir=DIR]
    python -m sscell.evaluation.finetune --workdir=BUNDLE --store=TARGET_STORE --outdir=DIR ...

For each label fraction, two supervised runs train the whole classifier (the pretrained run's
encoder architecture + a linear head, class-weighted cross-entropy; the config's optimiser, by
default the study's fine-tuning settings) on that fraction of the target's train cells: one starting
from the pretrained encoder (`train.init_from`), one from scratch (at fraction 1, the study's
supervised baseline). Each is an ordinary sscell run in OUTDIR/finetune/<arm>_<fraction>/
(resumable: rerunning continues or, when done, only scores); OUTDIR is --outdir, by default the
pretrained run's workdir. A bundle (`Model.export`, `python -m sscell.from_study`) pretrains as
well as a run, read by `sscell.bundle` (checksums, no code run), and is never written into:
--outdir is required with one. The target store must have the pretrained genes in order (convert
it with --vocabulary=BUNDLE for a bundle). Every arm's settings are checked
against the target before the first one trains. Fractions are nested seed-drawn
samples of the target's train cells (`select_rows`); no other cells are read for training.
Both arms are scored on the target's test cells (`predict_test`) two ways: the classifier head's
argmax (`finetune_*`) and, the study's transfer figures, kNN on the fine-tuned encoder's
embeddings with the target's validation cells (train cells if it has none) as the reference
(`finetune_knn_*`; the
Cell-Ontology-corrected `finetune_knn_macro_f1_ontology` is what the study reports); F1
definitions in docs/metrics.md. Written to OUTDIR/finetune.{md,csv}, which
`python -m sscell.evaluation` of the pretrained run then adds to its table.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from sscell.bundle import check_outside, is_bundle
from sscell.config import default_config, load_config
from sscell.data.loader import label_codes, row_batches, select_rows
from sscell.data.store import Store, open_store, resolved_location
from sscell.errors import SscellError, exit_on_error
from sscell.evaluation.metrics import f1_columns
from sscell.evaluation.neighbors import knn_predict
from sscell.evaluation.ontology import store_descendants
from sscell.evaluation.report import write_results
from sscell.evaluation.run import open_run
from sscell.training.resume import check_compatible
from sscell.training.state import check_pretrained_genes, pretrained_config
from sscell.training.step import task_batch
from sscell.training.train import check_run
from sscell.training.workdir_run import train_in_workdir

RESULTS = "finetune"  # OUTDIR/finetune.{md,csv} and the arms' folder OUTDIR/finetune/
ARMS = ("pretrained", "scratch")
MAX_DECAYS = 20  # the default schedule's most lr decays in a run (x0.9 twenty times: lr x 0.12 at the end)


def finetune_config() -> ml_collections.ConfigDict:
    """The study's fine-tuning: the whole classifier trained with 'balanced' class-weighted
    cross-entropy, AdamW lr 9e-4, weight decay 0.05, batch 16,384, clipping at norm 1, x0.9
    every 2 epochs (at most `MAX_DECAYS` times in a run: `arm_config`), scored at the checkpoint
    with the best validation loss."""
    config = default_config()
    config.loss.name = "supervised"
    config.train.update(steps=1_000, batch_size=16_384, lr=9e-4, weight_decay=0.05, val_every=100,
                        checkpoint_every=100)
    config.eval.checkpoint = "best"
    return config


def arm_dir(outdir: str, arm: str, fraction: float) -> str:
    """Where arm `arm` ("pretrained" or "scratch") at label fraction `fraction` runs."""
    return os.path.join(outdir, RESULTS, f"{arm}_{fraction:g}")


def results_dir(workdir: str, outdir: str | None) -> str:
    """Where the arms and the tables of fine-tuning from `workdir` go: `outdir`, by default the
    run's workdir; a bundle is never written into, so it needs an `outdir` outside it."""
    if not is_bundle(workdir):
        return outdir or workdir
    if not outdir:
        raise SscellError(f"{workdir} is a bundle, which is never written into; name a folder for the fine-tuned "
                          "runs and their table with --outdir=DIR (outdir=)")
    check_outside(workdir, outdir, "--outdir")
    return outdir


def arm_config(base: ml_collections.ConfigDict, workdir: str, store: Store, arm: str, fraction: float,
               datasets: tuple[str, ...], seed: int) -> ml_collections.ConfigDict:
    """The run config of one arm: `base` (fine-tuning settings) with the pretrained run's model,
    the target store, its datasets and label fraction, and, for the pretrained arm, its encoder.

    The batch is capped at the fraction's cells (rounded down to a multiple of the devices), and
    under step decay the decay interval is the same number of steps at every fraction:
    `base.train.lr_decay_steps` if > 0, else the study's `lr_decay_epochs` epochs of the whole
    selection at batch `base.train.batch_size`, but at least a `MAX_DECAYS`th of `train.steps`
    (on a small target an epoch is a step or two: x0.9 every 2 steps for 1,000 steps ends at lr x 1e-23).
    """
    config = base.copy_and_resolve_references()
    # config.json of the run or bundle alone: every arm re-reads it, and `finetune` checked a bundle already
    pretrained = load_config(workdir).model.to_dict()
    for key in config.model:  # the pretrained architecture; fields it predates keep their defaults
        value = pretrained.get(key, config.model[key])
        config.model[key] = tuple(value) if isinstance(value, list) else value
    config.seed = seed
    config.loss.name = "supervised"
    config.data.update(store=resolved_location(store.path), h5ad="", train_datasets=datasets, train_fraction=fraction)
    config.data.synthetic.n_cells = 0
    config.train.init_from = os.path.abspath(workdir) if arm == "pretrained" else ""

    devices = jax.device_count()
    n_all = len(select_rows(store, "train", datasets=datasets, seed=seed))
    n_cells = len(select_rows(store, "train", datasets=datasets, fraction=fraction, seed=seed))
    batch_all = min(base.train.batch_size, n_all // devices * devices)
    batch = min(base.train.batch_size, n_cells // devices * devices)
    if batch == 0:
        raise SscellError(f"label fraction {fraction:g} selects {n_cells} train cells, fewer than the {devices} "
                          "devices; choose a larger fraction")
    config.train.batch_size = batch
    if config.train.schedule == "step_decay" and not config.train.lr_decay_steps:
        study = int(base.train.lr_decay_epochs * (n_all // batch_all))
        config.train.lr_decay_steps = max(1, study, -(-config.train.steps // MAX_DECAYS))
    return config


def check_arm(config: ml_collections.ConfigDict, workdir: str, store: Store) -> None:
    """Every check of one arm's run that can fail, writing nothing: its settings against the
    target (`check_run`) and against a run already checkpointed in its `workdir`."""
    check_run(config, store)
    try:
        check_compatible(config, workdir)
    except SscellError as error:
        raise SscellError(f"{error}; its batch and schedule follow train.batch_size and the target's cells, so "
                          f"rerun with the settings it was trained with, or delete {workdir}") from None


def knn_reference(store: Store, datasets: tuple[str, ...], k: int) -> tuple[str, np.ndarray]:
    """(split, store rows) of the kNN reference of the transfer scores: the target's validation
    cells (of `datasets` only, if given), as in the study; when they are fewer than `k` (a
    dataset whose donors all fell into train and test), its train cells (every fraction's)."""
    for split in ("val", "train"):
        start, stop = store.split_range(split)
        rows = np.arange(start, stop, dtype=np.int64)
        if datasets:
            wanted = np.isin(np.asarray(store.datasets, dtype=str), list(datasets))
            rows = rows[wanted[label_codes(store, start, stop)["dataset"]]]
        if len(rows) >= k:
            return split, rows
    return "none", rows[:0]


def predict_test(arms: dict, store: Store, datasets: tuple[str, ...], batch_size: int, knn_k: int = 5,
                 knn_method: str = "auto") -> tuple[np.ndarray, dict[object, dict[str, np.ndarray]]]:
    """(true cell-type codes, {arm key: {"head": codes, "knn": codes}}) of the target's test
    cells (of `datasets` only, if given); `arms` maps keys to (config, workdir) of trained runs.

    "head" is the classifier's argmax; "knn" the vote of the `knn_k` nearest reference cells
    (`knn_reference`) on the fine-tuned encoder's embeddings, the study's transfer score (absent
    when there is no reference). Each split is read once for every arm; the codes are the
    store's, as in training.
    """
    loaded = {name: open_run(workdir, config.eval.checkpoint, store=store) for name, (config, workdir) in arms.items()}
    first = next(iter(loaded.values()))  # every arm has the same model on the same store
    model, measured = first.model, first.info.measured_table()

    @jax.jit
    def forward(params, batch):
        x = task_batch(batch, store.n_genes, measured)["x"]  # the model's training-time input
        embedding = model.apply({"params": params}, x, method="encode")
        return embedding, jnp.argmax(model.apply({"params": params}, x), axis=-1)

    def outputs(rows: np.ndarray) -> dict[object, tuple[np.ndarray, np.ndarray]]:
        parts = {name: [] for name in arms}
        for batch, n_valid in row_batches(store, rows, batch_size):
            for name, run in loaded.items():
                parts[name].append([np.asarray(a)[:n_valid] for a in jax.device_get(forward(run.params, batch))])
        return {name: tuple(np.concatenate(a) for a in zip(*p)) for name, p in parts.items()}

    test_rows = select_rows(store, "test", datasets=datasets)
    _, reference_rows = knn_reference(store, datasets, knn_k)
    test = outputs(test_rows)
    predicted = {name: {"head": test[name][1]} for name in arms}
    if len(reference_rows):
        codes = label_codes(store, 0, store.n_cells)["cell_type"]
        reference = outputs(reference_rows)
        for name in arms:
            predicted[name]["knn"] = knn_predict(reference[name][0], codes[reference_rows], test[name][0], knn_k,
                                                 knn_method)
    true = label_codes(store, 0, store.n_cells)["cell_type"][test_rows]
    return true, predicted


def run_settings(workdir: str, base: ml_collections.ConfigDict, steps: int | None, fractions: Sequence[float],
                 seed: int | None) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict, int]:
    """A copy of the arms' settings `base` (with `steps` if given), the pretrained run's (or
    bundle's) config and the seed (default: the pretrained run's); refuses an empty list of fractions."""
    base = base.copy_and_resolve_references()
    if steps is not None:
        base.train.steps = steps
    if not fractions:
        raise SscellError("no label fractions given; pass e.g. --fractions=0.01,0.1,1")
    pretrained = pretrained_config(workdir)
    return base, pretrained, pretrained.seed if seed is None else seed


def finetune(workdir: str, target_store: str, fractions: list[float], *, datasets: tuple[str, ...] = (),
             steps: int | None = None, seed: int | None = None, base: ml_collections.ConfigDict | None = None,
             arms: tuple[str, ...] = ARMS, outdir: str | None = None) -> list[dict]:
    """Fine-tune from the encoder of run (or bundle) `workdir` vs from scratch at each label fraction of
    `target_store`'s train cells (of `datasets` only, if given), score both on its test cells,
    write `outdir`/finetune.{md,csv} (and the arms' runs under `outdir`/finetune; default `outdir`:
    the run's workdir, required for a bundle, `results_dir`); returns the result rows ([] if
    preempted: rerun to resume).

    `base` holds the fine-tuning settings (default `finetune_config()`), `steps` overrides
    its train.steps (the same for every fraction and arm); `seed` (default: the pretrained
    run's) seeds the heads, the batch order and the fraction draw. `arms` may leave out
    "scratch" (e.g. when several pretrained runs share one from-scratch baseline).
    """
    outdir = results_dir(workdir, outdir)
    base, pretrained, seed = run_settings(workdir, base or finetune_config(), steps, fractions, seed)
    store = open_store(target_store)
    check_pretrained_genes(workdir, store)
    datasets = tuple(datasets)
    trained = {(arm, fraction): (arm_config(base, workdir, store, arm, fraction, datasets, seed),
                                 arm_dir(outdir, arm, fraction)) for fraction in fractions for arm in arms}
    for config, run in trained.values():  # every arm checked before the first trains
        check_arm(config, run, store)
    for config, run in trained.values():
        if not train_in_workdir(config, run, store):
            print(f"{run} stopped early (preempted); rerun the same command to resume")
            return []
    cells = {f: len(select_rows(store, "train", datasets=datasets, fraction=f, seed=seed)) for f in fractions}

    true, predicted = predict_test(trained, store, datasets, base.eval.batch_size, base.eval.knn_k,
                                   base.eval.knn_method)
    descendants = store_descendants(store)
    source = f"bundle {Path(workdir).name} ({pretrained.loss.name})" if is_bundle(workdir) else \
        f"sscell {pretrained.loss.name}"
    names = {"pretrained": f"fine-tuned from {source}", "scratch": "supervised from scratch"}
    rows = []
    for (arm, fraction), prediction in predicted.items():
        rows.append({"method": names[arm], "label_fraction": fraction, "train_cells": cells[fraction],
                     "steps": base.train.steps, **f1_columns("finetune", true, prediction["head"], descendants),
                     **(f1_columns("finetune_knn", true, prediction["knn"], descendants) if "knn" in prediction
                        else {})})
    if jax.process_index() == 0:
        table = write_results(rows, outdir, RESULTS)
        subset = f" of {', '.join(datasets)}" if datasets else ""
        split, reference = knn_reference(store, datasets, base.eval.knn_k)
        knn = (f"finetune_knn_*: {base.eval.knn_k}-NN on the fine-tuned embeddings, reference = {len(reference)} "
               f"{split} cells{subset}" if len(reference) else "no finetune_knn_* scores: too few reference cells")
        print(f"\nFine-tuning vs from scratch: {len(true)} test cells{subset} in {store.path}, "
              f"{base.eval.checkpoint} checkpoints; finetune_*: the classifier head; {knn}\n\n{table}\n"
              f"written to {outdir}/{RESULTS}.md, {RESULTS}.csv")
    return rows


def label_fractions(values: list[str]) -> list[float]:
    """The label fractions of a --fractions flag as floats; a non-number is refused in one line."""
    try:
        return [float(v) for v in values]
    except ValueError:
        raise SscellError(f"--fractions={','.join(values)} holds a non-number; pass e.g. 0.01,0.1,1") from None


def cli() -> None:
    """The command (its flags are defined here, so importing this module defines none)."""
    config = config_flags.DEFINE_config_file(
        "config", os.path.join(os.path.dirname(__file__), "finetune_defaults.py"),
        "Fine-tuning settings, e.g. experiments/finetune_cpu.py (default: the study's, finetune_config()); "
        "override any field with --config.FIELD=VALUE, e.g. --config.train.batch_size=64 "
        "--config.train.lr_decay_steps=100", lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "Work directory of the pretrained run, or a bundle.")
    outdir = flags.DEFINE_string("outdir", None, "Where the arms' runs (OUTDIR/finetune/<arm>_<fraction>) and "
                                 "finetune.{md,csv} go (default: the workdir; required for a bundle).")
    store = flags.DEFINE_string("store", None, "Target store (the same gene vocabulary as the pretrained run's "
                                "or bundle's: convert --vocabulary=BUNDLE).")
    datasets = flags.DEFINE_multi_string("dataset", [], "Target dataset_id(s) within the store (default: all).")
    fractions = flags.DEFINE_list("fractions", ["0.01", "0.1", "1"], "Label fractions of the target's train cells.")
    steps = flags.DEFINE_integer("steps", None, "Training steps of every run (default: the config's train.steps).")
    seed = flags.DEFINE_integer("seed", None, "Seed of the heads, batch order and fraction draw (default: the "
                                "pretrained run's).")
    flags.mark_flags_as_required(["workdir", "store"])

    def main(argv: list[str]) -> None:
        del argv
        logging.set_verbosity(logging.WARNING)
        with exit_on_error():
            finetune(workdir.value, store.value, label_fractions(fractions.value), datasets=tuple(datasets.value),
                     steps=steps.value, seed=seed.value, base=config.value, outdir=outdir.value)

    app.run(main)


if __name__ == "__main__":
    cli()
