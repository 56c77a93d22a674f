"""The CPU-scale reproduction pipeline, end to end on a tiny atlas: every setting scored, mean +- sd right."""
import importlib.util
import json
import os
import pathlib

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from sscell.errors import SscellError
from sscell.reproduce import knn_scores, paired_comparisons, report, reproduce, rescore

pytestmark = pytest.mark.slow

CONFIG = pathlib.Path(__file__).parent.parent / "experiments" / "reproduce_cpu.py"


def tiny_study(tmp_path):
    spec = importlib.util.spec_from_file_location("reproduce_cpu", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.atlas.update(n_cells=1600, n_genes=96, n_datasets=2, donors_per_dataset=4, target_cells=600,
                        target_cell_types=("B cell", "natural killer cell", "classical monocyte"))
    config.tasks = ("masked", "supervised", "masked_r25")
    config.task_overrides.masked_r25 = {"loss": {"name": "masked", "mask_rate": 0.25}}  # a variant of a loss
    config.seeds = (0, 1)
    config.data_seeds = True
    config.fractions = (1.0,)
    config.pretrain.model.update(hidden=(32, 32), latent=8)
    config.pretrain.train.update(steps=20, batch_size=64, log_every=10, val_every=10, checkpoint_every=10,
                                 val_batches=2)
    config.pretrain.eval.update(pca_components=8, batch_size=256, hvg_genes=50, scvi_epochs=2)
    config.finetune.train.update(steps=10, batch_size=64, log_every=5, val_every=5, checkpoint_every=5,
                                 val_batches=1)
    config.finetune.eval.update(batch_size=256)
    config.report_dir = str(tmp_path / "docs")
    return config


def test_reproduce_scores_every_setting_and_summarises_over_seeds(tmp_path):
    config = tiny_study(tmp_path)
    table = reproduce(config, str(tmp_path / "run"))

    scores = pd.read_csv(tmp_path / "run" / "scores.csv")
    settings = set(scores.setting)
    assert settings == {"zero-shot atlas", "zero-shot target", "fine-tune 1"}
    for setting in ("zero-shot atlas", "zero-shot target"):
        methods = set(scores[scores.setting == setting].method)
        assert {"sscell masked", "sscell supervised", "sscell masked_r25"} < methods
        assert any(m.startswith("PCA") for m in methods) and any(m.startswith("HVG") for m in methods)
        assert any(m.startswith("scVI") for m in methods) == (importlib.util.find_spec("scvi") is not None)
        assert scores[scores.setting == setting].fit_seconds.gt(0).all()  # training / fit time on every row
    tuned = set(scores[scores.setting == "fine-tune 1"].method)
    assert tuned == {"fine-tuned from sscell masked", "fine-tuned from sscell supervised",
                     "fine-tuned from sscell masked_r25", "supervised from scratch"}
    # the variant ran as its own run, with its loss and overrides
    variant = json.loads((tmp_path / "run" / "seed_0" / "masked_r25" / "config.json").read_text())
    assert variant["loss"]["name"] == "masked" and variant["loss"]["mask_rate"] == 0.25
    assert (scores.groupby(["setting", "method"]).size() == 2).all()  # one row per seed, baselines once
    # data seeds: each seed its own atlas, so the baselines, which do not train, vary too
    assert all((tmp_path / "run" / f"data_seed_{s}" / "atlas_store").exists() for s in (0, 1))
    pca = scores[(scores.setting == "zero-shot atlas") & scores.method.str.startswith("PCA")]
    assert pca.knn_macro_f1.nunique() > 1
    assert scores.filter(like="macro_f1").stack().between(0, 1).all()
    # the study's transfer figure (ontology-corrected kNN on the fine-tuned embeddings) beside the head's
    assert scores[scores.setting == "fine-tune 1"][["finetune_knn_macro_f1_ontology", "finetune_macro_f1"]].notna().all(None)

    row = table[(table.setting == "zero-shot target") & (table.method == "sscell masked")].iloc[0]
    values = scores[(scores.setting == "zero-shot target") & (scores.method == "sscell masked")].knn_macro_f1
    assert row.knn_macro_f1 == f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"
    assert row.seeds == 2
    report = (tmp_path / "docs" / "reproduce_cpu.md").read_text()
    assert "seeds [0, 1]" in report and "sscell masked" in report
    assert os.path.getsize(tmp_path / "docs" / "reproduce_cpu.png") > 0
    assert "masked vs every other method, paired by seed" in report
    assert (tmp_path / "docs" / "reproduce_cpu_comparisons.csv").exists()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "docs" / "reproduce_cpu_seeds.csv"), scores)


def test_knn_scores_keep_only_knn_rows():
    rows = [{"method": "sscell masked (step 20)", "knn_macro_f1": 0.8, "knn_micro_f1": 0.9},
            {"method": "PCA(64) log1p", "knn_macro_f1": 0.7, "knn_micro_f1": 0.8},
            {"method": "fine-tuned from sscell masked", "finetune_macro_f1": 0.9}]  # a workdir's fine-tuning row
    kept = knn_scores(rows, baselines=True, seed=3)
    assert [r["method"] for r in kept] == ["sscell masked", "PCA(64) log1p"] and all(r["seed"] == 3 for r in kept)
    assert [r["method"] for r in knn_scores(rows, baselines=False)] == ["sscell masked"]


def test_a_run_that_stops_early_is_not_scored(tmp_path, monkeypatch):
    """A pretraining run stopped by a preemption or Ctrl-C (train_in_workdir returns False) ends
    the study with nothing scored for it, so a rerun resumes instead of reporting a partial run."""
    import sscell.reproduce

    monkeypatch.setattr(sscell.reproduce, "train_in_workdir", lambda config, workdir, store: False)
    assert reproduce(tiny_study(tmp_path), str(tmp_path / "run")) is None
    assert not (tmp_path / "run" / "scores.csv").exists() and not (tmp_path / "docs").exists()


def test_paired_comparisons_match_a_t_interval_over_seed_differences():
    rng = np.random.default_rng(0)
    masked = rng.uniform(0.7, 0.9, 5)
    rows = [{"seed": s, "setting": "zero-shot target", "method": m, "knn_macro_f1": v}
            for s in range(5) for m, v in (("sscell masked", masked[s]), ("PCA(64) log1p", 0.6),
                                          ("sscell byol", masked[s] + (-1) ** s * 0.01))]
    rows += [{"seed": s, "setting": "fine-tune 0.01", "method": m, "finetune_knn_macro_f1_ontology": v}
             for s in range(5) for m, v in (("fine-tuned from sscell masked", 0.9 + 0.01 * s),
                                           ("supervised from scratch", 0.5 + 0.02 * s))]
    table = paired_comparisons(pd.DataFrame(rows), "masked").set_index("comparison")

    diff = masked - 0.6
    half = scipy.stats.t.ppf(0.975, 4) * diff.std(ddof=1) / np.sqrt(5)
    pca = table.loc["sscell masked - PCA(64) log1p"]
    assert pca["difference"] == f"{diff.mean():+.3f}" and pca["seeds"] == 5
    assert pca["95% interval"] == f"[{diff.mean() - half:+.3f}, {diff.mean() + half:+.3f}]"
    assert pca["verdict"] == "sscell masked ahead"
    assert table.loc["sscell masked - sscell byol", "verdict"] == "not distinguishable"  # +-0.01 around 0
    tuned = table.loc["fine-tuned from sscell masked - supervised from scratch"]
    assert tuned["score"] == "finetune_knn_macro_f1_ontology" and tuned["difference"] == "+0.380"
    # p: the paired t-test (an unpaired one gives another p on these seeds), then Holm over the table
    paired = scipy.stats.ttest_rel(masked, np.full(5, 0.6)).pvalue
    assert pca["p (paired t)"] == f"{paired:.3f}"
    byol = masked + (-1) ** np.arange(5) * 0.01
    assert (scipy.stats.ttest_ind(masked, byol).pvalue != scipy.stats.ttest_rel(masked, byol).pvalue)
    assert table.loc["sscell masked - sscell byol", "p (paired t)"] == f"{scipy.stats.ttest_rel(masked, byol).pvalue:.3f}"


def test_holm_adjustment_equals_statsmodels_and_decides_the_verdict():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    from sscell.reproduce import holm_adjusted

    p = np.array([0.01, 0.04, 0.03, 0.005, np.nan, 0.2, 0.04])
    valid = ~np.isnan(p)
    expected = multitest.multipletests(p[valid], method="holm")[1]
    np.testing.assert_allclose(holm_adjusted(p)[valid], expected, rtol=1e-12)
    assert np.isnan(holm_adjusted(p)[4])

    # three seeds, five comparisons: each is ahead unadjusted (p < 0.05), only the clearest after Holm
    rows = [{"seed": s, "setting": "zero-shot target", "method": "sscell masked", "knn_macro_f1": 0.8 + 0.01 * s}
            for s in range(3)]
    for i, noise in enumerate((0.002, 0.009, 0.011, 0.013, 0.015)):
        rows += [{"seed": s, "setting": "zero-shot target", "method": f"other {i}",
                  "knn_macro_f1": 0.75 + 0.01 * s + noise * (-1) ** s} for s in range(3)]
    table = paired_comparisons(pd.DataFrame(rows), "masked").set_index("comparison")
    unadjusted = table["p (paired t)"].astype(float)
    adjusted = table["p (Holm)"].astype(float)
    assert (unadjusted < 0.05).all() and (adjusted >= 0.05).any() and (adjusted < 0.05).any()
    assert ((adjusted < 0.05) == (table.verdict == "sscell masked ahead")).all()


def test_rescore_rewrites_a_report_from_its_seeds_csv_keeping_the_header(tmp_path):
    rows = [{"seed": s, "setting": "zero-shot target", "method": m, "knn_macro_f1": v}
            for s in range(3) for m, v in (("sscell masked", 0.8 + 0.01 * s), ("sscell masked_long", 0.9 - 0.01 * s),
                                          ("PCA(64) log1p", 0.7 + 0.02 * s))]
    rows += [{"seed": s, "setting": "fine-tune 1", "method": m, "finetune_knn_macro_f1_ontology": v,
              "finetune_macro_f1": v} for s in range(3)
             for m, v in (("fine-tuned from sscell masked", 0.9 + 0.01 * s), ("supervised from scratch", 0.85))]
    scores = pd.DataFrame(rows)
    docs = tmp_path / "docs"
    report(scores, str(docs), "Generated by the study on 2026-12-01.", "study", "masked")
    (docs / "study_comparisons.csv").unlink()

    rescore(str(docs / "study_seeds.csv"), ["masked", "masked_long"])
    text = (docs / "study.md").read_text()
    assert text.startswith("Generated by the study on 2026-12-01.\n\nComparisons recomputed from `study_seeds.csv`")
    assert "## masked_long vs every other method" in text and "p (Holm)" in text
    compared, expected = pd.read_csv(docs / "study_comparisons.csv", dtype=str), paired_comparisons(scores, "masked")
    assert list(compared.comparison) == list(expected.comparison) and list(compared.verdict) == list(expected.verdict)
    assert list(compared["p (Holm)"]) == list(expected["p (Holm)"])
    assert set(pd.read_csv(docs / "study_comparisons_masked_long.csv").comparison) == {
        "sscell masked_long - sscell masked", "sscell masked_long - PCA(64) log1p"}
    rescore(str(docs / "study_seeds.csv"))  # again: one recomputed line, not two; the first task by default
    text = (docs / "study.md").read_text()
    assert text.count("Comparisons recomputed") == 1 and "masked_long vs every" not in text

    (tmp_path / "bad_seeds.csv").write_text("a,b\n1,2\n")
    for path, message in ((tmp_path / "missing_seeds.csv", "no such file"), (tmp_path / "bad_seeds.csv", "needs columns"),
                          (docs / "study.csv", "NAME_seeds.csv")):
        with pytest.raises(SscellError, match=message):
            rescore(str(path))
    with pytest.raises(SscellError, match="no sscell byol"):
        rescore(str(docs / "study_seeds.csv"), ["byol"])


def test_zero_shot_comparisons_score_the_ontology_corrected_f1_where_the_scores_have_it():
    rows = [{"seed": s, "setting": "zero-shot target", "method": m, "knn_macro_f1": plain,
             "knn_macro_f1_ontology": corrected}
            for s in range(3) for m, plain, corrected in (("sscell masked", 0.6 + 0.01 * s, 0.9 + 0.01 * s),
                                                          ("PCA(64) log1p", 0.7, 0.8))]
    row = paired_comparisons(pd.DataFrame(rows), "masked").iloc[0]
    assert row["score"] == "knn_macro_f1_ontology" and row["difference"] == "+0.110"
