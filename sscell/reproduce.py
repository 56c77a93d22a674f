"""Reproduce the study's findings at CPU scale, over seeds, in one command.

    python -m sscell.reproduce --config=experiments/reproduce_cpu.py [--workdir=runs/reproduce_cpu]

1. Generates an auxiliary atlas (`config.atlas`, the pretraining corpus) and a target dataset
   with its own donors, a stronger batch effect and a subset of the cell types; converts both
   into stores over the atlas's gene vocabulary (WORKDIR/data/).
2. For each seed and pretext task (`config.tasks`, "supervised" being the supervised
   baseline), pretrains on the atlas (WORKDIR/seed_S/TASK/, an ordinary resumable run), then
   scores zero-shot kNN cell typing on the atlas's held-out donors and on the target
   (reference = validation cells, query = test cells; PCA baselines on the same cells), and
   fine-tunes a classifier on the target at each label fraction from the pretrained encoder
   and, once per seed, from scratch, scored by its head and, as the study does, by
   ontology-corrected kNN on the fine-tuned embeddings (`SCORES`).
3. Writes every score to WORKDIR/scores.csv and mean +- sd over seeds, a figure and the
   hardware and runtime to `config.report_dir`/reproduce_cpu.{md,png}.

Rerunning skips what is done (runs resume, or are only scored again). `--rescore=DIR/NAME_seeds.csv`
rewrites a report from the per-seed scores it holds (e.g. after a change to the statistics),
training nothing: `rescore`.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
import pandas as pd
import scipy.stats
from absl import app, flags, logging
from ml_collections import config_flags

from sscell.atomic import atomic_file
from sscell.data.convert import convert
from sscell.data.store import Store, open_store
from sscell.data.synthetic import AtlasSpec, programmes_path, target_path, tf_targets_path, write_atlas
from sscell.errors import SscellError, exit_on_error
from sscell.evaluation.evaluate import evaluate
from sscell.evaluation.finetune import ARMS, finetune
from sscell.evaluation.report import write_results
from sscell.training.train import check_run
from sscell.training.workdir_run import train_in_workdir

# macro F1 as the study computes it (docs/metrics.md); *_ontology: predicting a descendant of the true
# type counts as correct. finetune_knn_macro_f1_ontology is the study's transfer figure (kNN on the
# fine-tuned embeddings); finetune_macro_f1 scores the classifier head.
SCORES = ("knn_macro_f1", "knn_micro_f1", "knn_macro_f1_ontology", "finetune_knn_macro_f1_ontology",
          "finetune_macro_f1", "finetune_micro_f1", "fit_seconds")  # fit_seconds: training or baseline fit time


def prepare_data(spec: AtlasSpec, folder: str) -> tuple[Store, Store]:
    """(atlas store, target store), generated and converted into `folder` unless already there."""
    os.makedirs(folder, exist_ok=True)
    atlas = os.path.join(folder, "atlas.h5ad")
    stores = os.path.join(folder, "atlas_store"), os.path.join(folder, "target_store")
    if not all(os.path.exists(s) for s in stores):
        if not os.path.exists(target_path(atlas)):
            print(f"generating the atlas ({spec.n_cells} cells) and the target ({spec.target_cells} cells)")
            write_atlas(spec, atlas)
        if not os.path.exists(stores[0]):
            convert([atlas], stores[0], seed=spec.seed)
        vocabulary = os.path.join(folder, "genes.txt")
        with open(vocabulary, "w") as f:
            f.write("\n".join(open_store(stores[0]).var.index) + "\n")
        if not os.path.exists(stores[1]):
            convert([target_path(atlas)], stores[1], seed=spec.seed, vocabulary=vocabulary)
    return open_store(stores[0]), open_store(stores[1])


def pretrain_config(config: ml_collections.ConfigDict, task: str, seed: int, store: Store,
                    data_folder: str) -> ml_collections.ConfigDict:
    """The pretraining run of `task` with `seed`: `config.pretrain` with the task's overrides.

    A task is a loss name, or a variant of one: a name whose overrides set `loss.name`
    (e.g. "byol_no_nb" = BYOL without negative-binomial resampling), run and reported under its own name."""
    run = config.pretrain.copy_and_resolve_references()
    run.seed = seed
    run.loss.name = task
    run.data.store = os.path.abspath(store.path)
    for section, fields in config.task_overrides.get(task, {}).items():
        run[section].update(fields)
    gmt = tf_targets_path if run.loss.name == "gp_to_tf" else programmes_path
    run.loss.gmt = os.path.abspath(str(gmt(os.path.join(data_folder, "atlas.h5ad"))))
    return run


def named_as(rows: list[dict], loss: str, task: str) -> list[dict]:
    """`rows` with the run's methods ("sscell <loss>") named after its task ("sscell <task>")."""
    return [{**r, "method": r["method"].replace(f"sscell {loss}", f"sscell {task}")} for r in rows]


def pretrain(run: ml_collections.ConfigDict, workdir: str, store: Store) -> bool:
    """Train (or resume, or find finished) one pretraining run, as `sscell.main` does; False if it
    stopped early (preemption or Ctrl-C)."""
    check_run(run, store)
    return train_in_workdir(run, workdir, store)


def knn_scores(rows: list[dict], baselines: bool, **labels) -> list[dict]:
    """The kNN rows of an evaluation's `rows` (not e.g. the fine-tuning rows a workdir also
    reports) reduced to their method and SCORES columns, with `labels` added to each; the
    baselines' rows (methods not named "sscell ...") only if `baselines`."""
    return [{**labels, "method": r["method"].split(" (step")[0], **{k: r[k] for k in SCORES if k in r}}
            for r in rows if pd.notna(r.get("knn_macro_f1"))
            and (baselines or r["method"].startswith("sscell"))]


def run_seed(config: ml_collections.ConfigDict, workdir: str, seed: int, atlas: Store,
             target: Store, data_folder: str) -> list[dict] | None:
    """Every score of one seed: per task, zero-shot kNN on atlas and target, then fine-tuning;
    None if a run stopped early (preemption or Ctrl-C: nothing of it is scored, rerunning resumes).

    Baselines (`eval.baselines`: PCA, HVG expression, scVI; training from scratch) do not depend on
    the task: they are fitted and scored with the first task only.
    """
    rows = []
    for i, task in enumerate(config.tasks):
        run_dir = os.path.join(workdir, f"seed_{seed}", task)
        run = pretrain_config(config, task, seed, atlas, data_folder)
        if not pretrain(run, run_dir, atlas):
            return None
        baselines = None if i == 0 else ()  # the run's eval.baselines, fitted once per seed
        task_rows = knn_scores(evaluate(run_dir, ("knn",), baselines=baselines), i == 0, seed=seed,
                               setting="zero-shot atlas")
        task_rows += knn_scores(evaluate(run_dir, ("knn",), store=target.path, outdir=os.path.join(run_dir, "target"),
                                         baselines=baselines), i == 0, seed=seed, setting="zero-shot target")
        tuned = finetune(run_dir, target.path, list(config.fractions), steps=config.finetune.train.steps,
                         seed=seed, base=config.finetune, arms=ARMS if i == 0 else ("pretrained",))
        if not tuned:
            return None
        for r in tuned:
            task_rows.append({"seed": seed, "setting": f"fine-tune {r['label_fraction']:g}", "method": r["method"],
                              **{k: r[k] for k in SCORES if k in r}})
        rows += named_as(task_rows, run.loss.name, task)
    return rows


def summarise(scores: pd.DataFrame) -> pd.DataFrame:
    """Mean +- sd over seeds of each (setting, method) score."""
    columns = [c for c in SCORES if c in scores]
    grouped = scores.groupby(["setting", "method"], sort=False)[columns]
    mean, sd, n = grouped.mean(), grouped.std(ddof=1), grouped.size()
    table = mean.copy()
    for c in columns:
        table[c] = [f"{m:.3f} ± {s:.3f}" if np.isfinite(m) and np.isfinite(s) else (f"{m:.3f}" if np.isfinite(m) else "")
                    for m, s in zip(mean[c], sd[c])]
    table["seeds"] = n
    return table.reset_index()


def setting_score(setting: str, scores: pd.DataFrame) -> str:
    """The headline score of a setting, as the study scores it: kNN macro F1 zero-shot, ontology-
    corrected where `scores` have it (the study corrects every kNN label: kNN.py, evaluation_utils.py;
    the same score on leaf labels), and kNN on the fine-tuned embeddings, corrected, when fine-tuned."""
    if not setting.startswith("zero-shot"):
        return "finetune_knn_macro_f1_ontology"
    corrected = "knn_macro_f1_ontology"
    return corrected if corrected in scores and scores[corrected].notna().any() else "knn_macro_f1"


def holm_adjusted(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of the p-values `p` (NaN entries are left out of the family
    and stay NaN): the i-th smallest of m becomes max over j <= i of min(1, (m - j + 1) p_(j))."""
    p = np.asarray(p, np.float64)
    adjusted = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return adjusted


def paired_comparisons(scores: pd.DataFrame, reference: str, alpha: float = 0.05) -> pd.DataFrame:
    """Per setting, `reference` (a task) minus every other method on the setting's headline score,
    paired by seed: mean difference, 95% t-interval, paired t-test p over the seeds both ran, and
    that p Holm-adjusted over every comparison of the table. The verdict comes from the adjusted p:
    below `alpha` names the better method, else "not distinguishable" (a difference the same on
    every seed, whose p is undefined, names the better method)."""
    rows = []
    for setting, part in scores.groupby("setting", sort=False):
        column = setting_score(setting, part)
        by_method = part.pivot_table(index="seed", columns="method", values=column)[list(dict.fromkeys(part.method))]
        ours = next((m for m in by_method if m in (f"sscell {reference}", f"fine-tuned from sscell {reference}")), None)
        if ours is None:
            continue
        for other in by_method:
            pair = by_method[[ours, other]].dropna()
            if other == ours or len(pair) < 2:
                continue
            diff = pair[ours] - pair[other]
            mean, sd, n = diff.mean(), diff.std(ddof=1), len(diff)
            half = scipy.stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n)
            p = scipy.stats.ttest_rel(pair[ours], pair[other]).pvalue if sd > 0 else np.nan
            rows.append({"setting": setting, "score": column, "comparison": f"{ours} - {other}", "mean": mean,
                         "ours": ours, "other": other, "difference": f"{mean:+.3f}",
                         "95% interval": f"[{mean - half:+.3f}, {mean + half:+.3f}]", "p": p, "seeds": n})
    if not rows:
        return pd.DataFrame()
    table = pd.DataFrame(rows)
    table["p (Holm)"] = holm_adjusted(table.p.to_numpy())
    ahead = np.where(table.p.isna(), table["mean"] != 0, table["p (Holm)"] < alpha)
    table["verdict"] = np.where(ahead, np.where(table["mean"] > 0, table.ours, table.other) + " ahead",
                                "not distinguishable")
    table["p (paired t)"] = [f"{p:.3f}" if np.isfinite(p) else "" for p in table.p]
    table["p (Holm)"] = [f"{p:.3f}" if np.isfinite(p) else "" for p in table["p (Holm)"]]
    return table[["setting", "score", "comparison", "difference", "95% interval", "p (paired t)", "p (Holm)",
                  "seeds", "verdict"]]


def plot(scores: pd.DataFrame, path: str) -> None:
    """Zero-shot kNN macro F1 per method (target and atlas) and fine-tuning macro F1 vs label fraction."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, setting in zip(axes[:2], ("zero-shot atlas", "zero-shot target")):
        rows = scores[scores.setting == setting]
        column = setting_score(setting, rows)
        part = rows.groupby("method", sort=False)[column]
        ax.bar(range(part.ngroups), part.mean(), yerr=part.std(ddof=1), capsize=3, color="tab:blue")
        ax.set_xticks(range(part.ngroups), list(part.groups), rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{setting}: {column}")
        ax.set_ylim(0, 1)
    tuned = scores[scores.setting.str.startswith("fine-tune")].copy()
    tuned["fraction"] = tuned.setting.str.split().str[-1].astype(float)
    for method, part in tuned.groupby("method", sort=False):
        stats = part.groupby("fraction")["finetune_macro_f1"]
        axes[2].errorbar(stats.mean().index, stats.mean(), yerr=stats.std(ddof=1), marker="o", capsize=3,
                         label=method)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("label fraction of the target's train cells")
    axes[2].set_title("target: fine-tuned macro F1")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def reproduce(config: ml_collections.ConfigDict, workdir: str) -> pd.DataFrame | None:
    """Run the whole study (see the module docstring); returns the summary table, or None if a
    run stopped early (rerunning resumes)."""
    started = time.perf_counter()
    spec = AtlasSpec(**config.atlas.to_dict())
    data_seeds = config.get("data_seeds", False)
    rows = []
    for seed in config.seeds:
        # data seeds: each seed generates its own atlas and target (atlas.seed + seed), so the
        # intervals also hold the variation of the data, and the baselines get an sd of their own
        data_folder = os.path.join(workdir, f"data_seed_{seed}" if data_seeds else "data")
        atlas, target = prepare_data(dataclasses.replace(spec, seed=spec.seed + seed) if data_seeds else spec,
                                     data_folder)
        seed_rows = run_seed(config, workdir, seed, atlas, target, data_folder)
        if seed_rows is None:
            print("a run stopped early (preempted or interrupted): nothing was scored for it; rerun the same "
                  "command to resume")
            return None
        rows += seed_rows
    scores = pd.DataFrame(rows)
    scores.to_csv(os.path.join(workdir, "scores.csv"), index=False)
    minutes = (time.perf_counter() - started) / 60
    hardware = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), jax {jax.__version__}"
    seeds = f"seeds {list(config.seeds)}" + (" (each with its own atlas and target)" if data_seeds else
                                             " (training; one atlas and target)")
    header = (f"Generated by `python -m sscell.reproduce`: atlas {atlas.n_cells} cells x {atlas.n_genes} genes, "
              f"target {target.n_cells} cells; {seeds}; {hardware}; "
              f"{minutes:.0f} min (this invocation).")
    return report(scores, config.report_dir, header, config.get("report_name", "reproduce_cpu"),
                  config.get("references", (config.tasks[0],)))


def report(scores: pd.DataFrame, report_dir: str, header: str, name: str = "reproduce_cpu",
           reference: str | Sequence[str] = "masked") -> pd.DataFrame:
    """Write the summary of `scores` (mean +- sd over seeds), the paired comparisons with each
    `reference` task, the figure and `header` into `report_dir`/`name`.{md,csv,png}: comparisons
    with the first reference also in `name`_comparisons.{md,csv}, with each further one in
    `name`_comparisons_<task>.{md,csv} (each table is its own Holm family); the scores of every
    seed in `name`_seeds.csv. Returns the summary table."""
    references = [reference] if isinstance(reference, str) else list(reference)
    table = summarise(scores)
    os.makedirs(report_dir, exist_ok=True)
    with atomic_file(os.path.join(report_dir, f"{name}_seeds.csv")) as tmp:  # every seed's scores, for pairing
        scores.to_csv(tmp, index=False)
    plot(scores, os.path.join(report_dir, f"{name}.png"))
    markdown = write_results(table.to_dict("records"), report_dir, name)
    sections = []
    for i, task in enumerate(references):
        compared = paired_comparisons(scores, task)
        paired = (write_results(compared.to_dict("records"), report_dir,
                                f"{name}_comparisons" + (f"_{task}" if i else ""))
                  if len(compared) else "(one seed: no paired comparisons)")
        sections.append(f"## {task} vs every other method, paired by seed\n\n{paired}")
    path = os.path.join(report_dir, f"{name}.md")
    paired = "\n".join(sections)
    with atomic_file(path) as tmp:
        tmp.write_text(f"{header}\n\n{markdown}\n{paired}\n![scores]({name}.png)\n")
    print(f"\n{header}\n\n{markdown}\n{paired}\nwritten to {report_dir}/{name}.md, .csv, .png")
    return table


RESCORED = "Comparisons recomputed from"  # how the line `rescore` adds to a report's header starts


def rescore(seeds_csv: str, references: Sequence[str] = ()) -> pd.DataFrame:
    """Rewrite the report of `seeds_csv` (a DIR/NAME_seeds.csv that `report` wrote) from its scores,
    training nothing: DIR/NAME.{md,csv,png} and the comparisons, with each of `references` (tasks;
    default the first sscell task in the file). The header paragraph of the existing NAME.md (how
    and when the scores were generated) is kept, with a line saying when the comparisons were
    recomputed in place of any earlier such line. Returns the summary table."""
    if not seeds_csv.endswith("_seeds.csv"):
        raise SscellError(f"--rescore={seeds_csv}: give the NAME_seeds.csv that python -m sscell.reproduce wrote")
    if not os.path.isfile(seeds_csv):
        raise SscellError(f"--rescore={seeds_csv}: no such file")
    try:
        scores = pd.read_csv(seeds_csv, float_precision="round_trip")  # rewritten byte for byte
    except (ValueError, UnicodeDecodeError) as error:
        raise SscellError(f"--rescore={seeds_csv}: not a CSV of per-seed scores ({error})") from None
    missing = [c for c in ("seed", "setting", "method") if c not in scores]
    if missing or not any(c in scores for c in SCORES[:-1]):
        raise SscellError(f"--rescore={seeds_csv}: not a per-seed scores CSV of python -m sscell.reproduce "
                          f"(needs columns seed, setting, method and a score such as knn_macro_f1; "
                          f"has {', '.join(map(str, scores.columns))})")
    tasks = [m.removeprefix("sscell ") for m in dict.fromkeys(scores.method) if m.startswith("sscell ")]
    references = list(references) or tasks[:1]
    unknown = [t for t in references if t not in tasks]
    if not references or unknown:
        raise SscellError(f"--rescore={seeds_csv}: no sscell {' or '.join(unknown) or 'task'} in it "
                          f"(tasks: {', '.join(tasks) or 'none'})")
    report_dir, name = os.path.dirname(seeds_csv) or ".", os.path.basename(seeds_csv).removesuffix("_seeds.csv")
    previous = os.path.join(report_dir, f"{name}.md")
    lines = []
    if os.path.exists(previous):
        with open(previous) as f:
            for line in f.read().split("\n\n"):
                if line.startswith(("|", "#")):
                    break
                lines.append(line)
    lines = [line for line in lines if not line.startswith(RESCORED)]
    lines.append(f"{RESCORED} `{name}_seeds.csv` on {datetime.date.today().isoformat()} "
                 f"(`python -m sscell.reproduce --rescore={seeds_csv}"
                 + (f" --references={','.join(references)}`" if len(references) > 1 else "`")
                 + "): paired t-test per comparison, Holm-adjusted over each table; "
                 "a verdict names the better method when the adjusted p is below 0.05.")
    return report(scores, report_dir, "\n\n".join(lines), name, references)


def main(argv: list[str]) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    config, seeds_csv = flags.FLAGS["config"].value, flags.FLAGS["rescore"].value
    if (config is None) == (seeds_csv is None):
        raise app.UsageError("give --config (run the study) or --rescore=NAME_seeds.csv (rewrite its report)")
    workdir = flags.FLAGS["workdir"].value or os.path.join("runs", "reproduce_cpu")
    with exit_on_error():
        if seeds_csv:
            rescore(seeds_csv, [t for t in flags.FLAGS["references"].value.split(",") if t])
        else:
            reproduce(config, workdir)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Study config, e.g. experiments/reproduce_cpu.py.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Where the data and runs go (default runs/reproduce_cpu).")
    flags.DEFINE_string("rescore", None, "Rewrite the report of this NAME_seeds.csv (written by an earlier run) "
                        "from its scores, training nothing.")
    flags.DEFINE_string("references", "", "With --rescore: the tasks every method is compared with, "
                        "comma-separated (default the first sscell task in the file; the config's "
                        "`references` when running).")
    app.run(main)
