"""Evaluate a run from its workdir alone: `python -m sscell.evaluation --workdir=runs/quickstart [--tasks=knn,umap]`.

The selected tasks (`eval.tasks`, registered in `sscell.evaluation.tasks`: knn, linear_probe,
reconstruction, integration, umap, and the finetune / crossmodal tables; a task of your own
through `eval.module`, docs/extending.md) say what they need, and only that is prepared: the
run's `eval.checkpoint` checkpoint (parameters alone, `sscell.evaluation.run.open_run`) embeds
the validation and test cells (and, for the linear probe or a training-cell kNN reference, a
sample of training cells); the baselines (`eval.baselines`, registered in
`sscell.evaluation.baselines`: PCA of log1p-normalised counts, PCA of the highly variable genes,
the highly variable genes themselves, scVI when scvi-tools is installed) embed the same cells
(cached in WORKDIR/eval_cache, `sscell.evaluation.cells.BaselineCache`). Each task then scores
every method on the same cells; methods with identical embeddings (PCA of the HVGs when every
gene is one) are scored once. `fit_seconds` holds each baseline's fit time and, on the model's
row, the run's training wall time (`train/wall_s` in metrics.jsonl); which baselines ran, and
why any did not, is printed and written under every markdown table.

A bundle (`Model.export`, `python -m sscell.from_study`) is evaluated on a store with its genes
(`--store`, required), writing into `--outdir` (required; the baselines' cache in OUTDIR/eval_cache),
never into the bundle: its encoder alone (`sscell.evaluation.run.open_bundle`), no module imported,
no task built, so no reconstruction, no training time (fit_seconds NaN) and no finetune /
crossmodal tables. Under `eval.protocol="study"` a model imported from the study's checkpoints
embeds as the study's evaluation does (`sscell.evaluation.run.bundle_embedder`).

Writes into the workdir (or `outdir`): results.{csv,md} (one row per method, then the rows of
the finetune / crossmodal tables), per_class_f1.{csv,md}, integration.{csv,md},
umap_cell_type.png, umap_batch.png, bars_<task>.png and loss_curve.png; prints the headline
columns (`headline_table`).
"""
from __future__ import annotations

import os
import time

import jax
import ml_collections
import numpy as np
import pandas as pd

from sscell.allocator import retain_freed_memory
from sscell.bundle import check_outside, is_bundle
from sscell.config import CONFIG_FILE, default_config, load_config, trust_modules
from sscell.data.loader import label_names
from sscell.data.store import open_store
from sscell.errors import SscellError
from sscell.evaluation.baselines import load_baselines
from sscell.evaluation.cells import BaselineCache, Cells, Evaluator, Reconstructions
from sscell.evaluation.figures import plot_bars
from sscell.evaluation.ontology import store_descendants
from sscell.evaluation.report import markdown_table, plot_loss_curves, write_results
from sscell.evaluation.run import open_bundle, open_run
from sscell.evaluation.tasks import EvalTask, Inputs, Outcome, load_tasks
from sscell.evaluation.tasks.knn import check_protocol, knn_reference_splits
from sscell.losses import load_task
from sscell.training.metric_writer import TRAIN_SECONDS, last_value
from sscell.training.state import check_same_genes, pretrained_config
from sscell.training.workdir_lock import workdir_lock

__all__ = ["eval_settings", "evaluate", "headline_table"]

CACHE_DIR = "eval_cache"  # WORKDIR/eval_cache: the baselines' embeddings (BaselineCache)


def eval_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run's `eval` section over today's defaults (a run saved before a field existed gets its default)."""
    settings = default_config().eval
    settings.update(config.eval.to_dict())
    return settings


def train_cells_needed(tasks: tuple[EvalTask, ...], settings) -> int | None:
    """How many training cells to embed (0: all; None: none): the most any task needs."""
    limits = [n for n in (task.train_cells(settings) for task in tasks) if n is not None]
    if not limits:
        return None
    return 0 if 0 in limits else max(limits)


def aliases(splits: list[Cells | None], methods: list[str]) -> dict[str, str]:
    """method -> the first earlier method whose embeddings are identical on every split."""
    found = {}
    for i, m in enumerate(methods):
        same = [o for o in methods[:i] if o not in found and all(
            s is None or np.array_equal(s.embeddings[m], s.embeddings[o]) for s in splits)]
        if same:
            found[m] = same[0]
    return found


def evaluate(workdir: str, tasks=None, store: str | None = None, outdir: str | None = None,
             knn_reference: str | None = None, eval_module: str | None = None, baselines=None,
             protocol: str | None = None, *, loss_module: str | None = None) -> list[dict]:
    """Run the evaluation tasks (default `eval.tasks`) on `workdir`'s `eval.checkpoint` checkpoint;
    returns the result rows (the model's first). `knn_reference` overrides `eval.knn_reference`,
    `baselines` (names or a comma-separated string) `eval.baselines`, `protocol` `eval.protocol`
    ("study" also scores the study's per-split PCA, baseline pca_per_split).

    `eval_module` (a module registering evaluation tasks of your own) and `loss_module` (the
    run's pretext task of your own) override `eval.module` and `loss.module`: a module the run's
    config names is imported only when named here, else refused (`sscell.config.trust_modules`).
    `store` evaluates the cells of another store with the run's gene vocabulary (e.g. a
    transfer target) instead of the run's own; outputs go to `outdir` (default: the workdir).
    The finetune / crossmodal tables are appended only when the run's own store is evaluated.
    `workdir` may be a bundle: `store` and `outdir` are then required (`_evaluate_bundle`).
    The workdir is locked meanwhile (WORKDIR/lock: not while a run trains in it). Freed host
    memory stays in the process from then on (`sscell.allocator`).
    """
    if is_bundle(workdir):
        return _evaluate_bundle(workdir, tasks, store, outdir, knn_reference, eval_module, baselines, protocol,
                                loss_module)
    config = load_config(workdir)
    trust_modules(config, os.path.join(workdir, CONFIG_FILE), eval_module=eval_module, loss_module=loss_module)
    with workdir_lock(workdir):
        return _evaluate(workdir, config, tasks, store, outdir, knn_reference, baselines, protocol)


def _evaluate_bundle(bundle: str, tasks, store: str | None, outdir: str | None, knn_reference: str | None,
                     eval_module: str | None, baselines, protocol: str | None, loss_module: str | None) -> list[dict]:
    """`evaluate` of a bundle: on `store` into `outdir` (both required, `outdir` outside it); its
    config's modules are never imported (an `eval_module` you name is), and nothing locks or writes it."""
    if not store or not outdir:
        raise SscellError(f"{bundle} is a bundle, with neither cells nor room for results: evaluate it on a store "
                          "with its genes into a folder of yours, --store=STORE --outdir=DIR (store=, outdir=)")
    check_outside(bundle, outdir, "--outdir")
    if loss_module:
        raise SscellError(f"{bundle} is a bundle, evaluated by its encoder alone (no pretext task is built); "
                          "drop --loss_module")
    config = pretrained_config(bundle)
    config.eval.module, config.loss.module = eval_module or "", ""
    return _evaluate(bundle, config, tasks, store, outdir, knn_reference, baselines, protocol, bundle=True)


def _evaluate(workdir: str, config: ml_collections.ConfigDict, tasks, store: str | None, outdir: str | None,
              knn_reference: str | None, baselines, protocol: str | None, bundle: bool = False) -> list[dict]:
    """`evaluate` with the run's `config` (its modules settled), the workdir locked; or of the
    `bundle` at `workdir` (`_evaluate_bundle`)."""
    started = time.perf_counter()
    retain_freed_memory()
    settings = eval_settings(config)
    selected = load_tasks(settings.tasks if tasks is None else tasks, settings.module)
    if knn_reference is not None:
        settings.knn_reference = knn_reference
    knn_reference_splits(settings.knn_reference)  # a bad choice fails before anything is computed
    if protocol is not None:
        settings.protocol = protocol
    if baselines is not None:
        settings.baselines = tuple(b.name for b in load_baselines(baselines))
    if any(t.name == "knn" for t in selected):
        check_protocol(settings.protocol, settings.knn_reference)
    if settings.protocol == "study" and "pca_per_split" not in settings.baselines:
        settings.baselines = (*settings.baselines, "pca_per_split")
    check_baselines(settings.baselines, selected)
    needs = set().union(*(t.needs for t in selected))
    outdir = outdir or workdir
    os.makedirs(outdir, exist_ok=True)
    inputs = Inputs(settings=settings, seed=config.seed, store=None, workdir=workdir, outdir=outdir,
                    own_store=store is None, loss=config.loss.name)
    outcome = Outcome({})
    if needs:  # else (result tables only) nothing is restored
        if not bundle:
            load_task(config.loss)  # its module, if named, imported first
        _embed(workdir, store, selected, needs, inputs, outcome, bundle)
    for task in selected:
        _score(task, inputs, outcome)

    rows = list(outcome.rows.values()) + outcome.extra_rows
    if jax.process_index() != 0:  # every process computes, one writes
        return rows
    ran = ", ".join(t.name for t in selected if t.name not in outcome.not_run) or "no task"
    not_run = [f"not run: {'; '.join(f'{name} ({why})' for name, why in outcome.not_run.items())}"
               ] if outcome.not_run else []
    if not rows:
        print("\n".join([f"Evaluated {ran}: nothing to report", *not_run]))
        return rows
    footer = "\n".join(outcome.footnotes)
    write_results(rows, outdir, footer=footer)
    _write(outdir, workdir, selected, outcome, footer)
    types = f"; {len(inputs.type_names)} cell types" if inputs.type_names else ""
    ontology = "; ontology-aware F1 with the Cell Ontology" if inputs.descendants is not None else ""
    print(f"\nEvaluated {ran} in {time.perf_counter() - started:.0f} s{types}{ontology}"
          + "".join(f"\n- {line}" for line in outcome.described)
          + f"\n\n{headline_table(rows, selected)}" + "".join(f"\n{note}" for note in outcome.footnotes
                                                               + outcome.notes + not_run)
          + f"\nfull table: {os.path.join(outdir, 'results.md')} (and .csv); also written: {', '.join(outcome.files)}")
    return rows


def _score(task: EvalTask, inputs: Inputs, outcome: Outcome) -> None:
    """`task`'s scores, its name and seconds printed as it starts and ends (by process 0)."""
    primary, started = jax.process_index() == 0, time.perf_counter()
    if primary:
        print(f"eval: {task.name} ...", end="", flush=True)
    task.score(inputs, outcome)
    if primary:
        print(" not run" if task.name in outcome.not_run else f" {time.perf_counter() - started:.1f} s", flush=True)


def _embed(workdir: str, store: str | None, tasks: tuple[EvalTask, ...], needs: set[str], inputs: Inputs,
           outcome: Outcome, bundle: bool = False) -> None:
    """Restore the run (or open the bundle on `store`), embed the cells the tasks need (model and
    baselines) into `inputs`, and start a result row per method in `outcome`."""
    settings = inputs.settings
    if bundle:
        evaluated = open_store(store)
        run = open_bundle(workdir, evaluated, settings.protocol)
        study = " the study's embedding," if run.model.output_activation != "none" else ""
        method = f"bundle {os.path.basename(os.path.normpath(workdir))} ({run.config.loss.name},{study} step {run.step})"
    else:
        run = open_run(workdir)
        if store is None:
            evaluated = run.store
        else:
            evaluated = open_store(store)
            check_same_genes(run.store.path, evaluated, workdir)
        method = f"sscell {run.config.loss.name} (step {run.step})"
    reconstruct = "reconstructions" in needs and hasattr(run.model, "reconstruct")  # a model without a decoder: none
    cache = BaselineCache(os.path.join(inputs.outdir if bundle else workdir, CACHE_DIR), evaluated, settings,
                          run.config.seed)
    evaluator = Evaluator(run, evaluated, settings, method, reconstruct, cache)
    inputs.store = evaluated
    inputs.reconstructions = Reconstructions() if reconstruct else None
    started = time.perf_counter()
    inputs.val = evaluator.cells("val", settings.max_cells)
    inputs.test = evaluator.cells("test", settings.max_cells, inputs.reconstructions)
    train_cells = train_cells_needed(tasks, settings)
    inputs.train = evaluator.cells("train", train_cells) if train_cells is not None else None
    inputs.methods = list(inputs.test.embeddings)
    if jax.process_index() == 0:
        train = f", {len(inputs.train):,} train" if inputs.train is not None else ""
        print(f"eval: embedded {len(inputs.val):,} val, {len(inputs.test):,} test{train} cells by "
              f"{len(inputs.methods)} methods in {time.perf_counter() - started:.1f} s", flush=True)
    inputs.unintegrated = evaluator.baseline_methods.get("pca", "")
    inputs.aliases = aliases([inputs.val, inputs.test, inputs.train], inputs.methods)
    inputs.type_names = label_names(evaluated, "cell_type")
    inputs.descendants = store_descendants(evaluated) if "ontology" in needs else None
    outcome.rows.update({m: {"method": m} for m in inputs.methods})
    # None: not recorded (a bundle, or a run from before train/wall_s)
    trained = None if bundle else last_value(os.path.join(workdir, "metrics.jsonl"), TRAIN_SECONDS)
    outcome.rows[method]["fit_seconds"] = float("nan") if trained is None else trained
    for run in evaluator.ran.values():
        outcome.rows[run.method]["fit_seconds"] = run.fit_seconds
    outcome.footnotes += baselines_summary(evaluator, trained, bundle)


def check_baselines(names, tasks: tuple[EvalTask, ...]) -> None:
    """Refuse unknown `eval.baselines`, and integration scores without their unintegrated reference."""
    load_baselines(names)
    if any(t.name == "integration" for t in tasks) and "pca" not in names:
        raise SscellError("the integration task needs the pca baseline (its unintegrated reference) in "
                          "eval.baselines; add it or leave integration out of eval.tasks")


def baselines_summary(evaluator: Evaluator, trained: float | None, bundle: bool = False) -> list[str]:
    """Which baselines ran, with their fit times next to the model's training time, and why any did not."""
    ran = ", ".join(f"{run.method} {run.fit_seconds:.1f} s" for run in evaluator.ran.values()) or "none"
    training = "a bundle, training time not recorded" if bundle else \
        "training time not recorded (a run older than train/wall_s)" if trained is None else \
        f"{trained:.0f} s of training"
    return ([f"baselines (eval.baselines): {ran} to fit; sscell: {training} (fit_seconds)"]
            + [f"{label} skipped: {why}" for label, why in evaluator.skipped.items()])


def headline_table(rows: list[dict], tasks: tuple[EvalTask, ...]) -> str:
    """A markdown table of the selected tasks' headline columns (e.g. kNN and probe macro F1,
    masked EV, scIB total) for every method that has one."""
    columns = [c for t in tasks for c in t.headline if any(c in r for r in rows)]
    columns += ["fit_seconds"] if columns and any("fit_seconds" in r for r in rows) else []
    shown = [r for r in rows if any(c in r for c in columns)]
    if not shown:
        return "(no headline columns: see the full table)"
    return markdown_table(shown, ["method", *columns])


def _write(outdir: str, workdir: str, tasks: tuple[EvalTask, ...], outcome: Outcome, footer: str) -> None:
    """The side tables (`footer` under each markdown table) and figures into `outdir`
    (results.csv/md are written by the caller); the loss curves of the run in `workdir`."""
    if outcome.per_class:
        table = pd.DataFrame(outcome.per_class)
        table.index.name = "cell_type"
        write_results(table.reset_index().to_dict("records"), outdir, "per_class_f1", footer)
        outcome.files.append("per_class_f1.csv/.md")
    for name, table_rows in outcome.tables.items():
        write_results(table_rows, outdir, name, footer)
        outcome.files.append(f"{name}.csv/.md")
    for task in tasks:
        if task.bars and any(c in row for row in outcome.rows.values() for c in task.columns):
            plot_bars(list(outcome.rows.values()), task.columns, task.name.replace("_", " "),
                      os.path.join(outdir, f"bars_{task.name}.png"))
            outcome.files.append(f"bars_{task.name}.png")
    metrics = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics):
        plot_loss_curves(metrics, os.path.join(outdir, "loss_curve.png"))
        outcome.files.append("loss_curve.png")
