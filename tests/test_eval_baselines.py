"""The evaluation's baselines as a registry: the HVG baseline against numpy, selection and bad
names, scVI end to end (fit time, cache, determinism) and its skip without scvi-tools."""
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import train_tiny_run  # tests/ is on sys.path (rootdir conftest)

from sscell.config import default_config
from sscell.data.genes import highly_variable_genes
from sscell.data.loader import label_codes
from sscell.errors import SscellError
from sscell.evaluation.baselines import load_baselines, registered
from sscell.evaluation.cells import Evaluator
from sscell.evaluation.evaluate import CACHE_DIR, eval_settings, evaluate
from sscell.evaluation.run import open_run
from sscell.evaluation.tasks import integration as integration_task

SKIP_LINE = "scVI skipped: scvi-tools is not installed (pip install -e '.[baselines]')"


@pytest.fixture(scope="module")
def run(tiny_store, tmp_path_factory):
    """A run trained 20 steps on the tiny store; scVI fitted on 600 training cells for 3 epochs."""
    workdir = tmp_path_factory.mktemp("baselines")
    return workdir, train_tiny_run(tiny_store, workdir, hvg_genes=40, scvi_cells=600, scvi_epochs=3)


def log1p_input(store, split: str) -> np.ndarray:
    """numpy: the split's counts, unmeasured genes zeroed, as log1p counts per 10k."""
    start, stop = store.split_range(split)
    counts = store.read_rows(start, stop).toarray().astype(np.float64)
    if len(store.measured):
        counts *= store.measured[label_codes(store, start, stop)["dataset"]]
    library = counts.sum(1, keepdims=True)
    return np.log1p(counts * np.where(library > 0, 1e4 / np.maximum(library, 1e-12), 0.0))


def without_uncached_fit_times(rows: list[dict]) -> list[dict]:
    """`rows` without the HVG baseline's fit time (its gene choice is timed anew: it is not cached)."""
    return [{k: v for k, v in r.items() if not (k == "fit_seconds" and r["method"].startswith("HVG"))} for r in rows]


def test_the_hvg_baseline_is_the_log1p_input_of_the_validation_cells_hvgs(run, tiny_store):
    workdir, config = run
    settings = eval_settings(config)
    settings.update(baselines=("hvg",), baseline_cells=100)
    evaluator = Evaluator(open_run(workdir), tiny_store, settings, "model", False)
    embedded = evaluator.cells("test", 0).embeddings
    genes = highly_variable_genes(log1p_input(tiny_store, "val")[:100], 40)
    assert list(embedded) == ["model", "HVG(40) log1p"] and len(genes) == 40
    np.testing.assert_allclose(embedded["HVG(40) log1p"], log1p_input(tiny_store, "test")[:, genes], rtol=1e-5,
                               atol=1e-6)


def test_baselines_are_selected_by_name_and_a_bad_name_is_refused(run):
    assert registered() == ("pca", "pca_hvg", "hvg", "scvi", "pca_per_split")
    assert default_config().eval.baselines == registered()[:4]  # pca_per_split: the study's protocol only
    assert [b.name for b in load_baselines("hvg, pca,hvg")] == ["hvg", "pca"] and load_baselines(()) == ()
    workdir, _ = run
    with pytest.raises(SscellError, match=r"unknown baseline\(s\) umap_pca; choose from pca, pca_hvg, hvg, scvi, pca_per_split "
                                          r"\(eval.baselines or --baselines\)"):
        evaluate(str(workdir), tasks="knn", baselines="pca,umap_pca")
    with pytest.raises(SscellError, match="the integration task needs the pca baseline"):
        evaluate(str(workdir), tasks="integration", baselines="hvg")


@pytest.mark.slow
def test_scvi_runs_end_to_end_deterministically_with_its_fit_time(run, tmp_path, capsys):
    workdir, _ = run
    shutil.rmtree(workdir / CACHE_DIR, ignore_errors=True)
    rows = evaluate(str(workdir), tasks="knn", outdir=str(tmp_path / "first"))
    methods = ["sscell masked (step 20)", "PCA(8) log1p", "PCA(8) HVG(40)", "HVG(40) log1p", "scVI(30) HVG(40)"]
    results = pd.read_csv(tmp_path / "first" / "results.csv")
    assert [r["method"] for r in rows] == list(results["method"]) == methods
    assert (results["fit_seconds"] > 0).all() and (results["knn_macro_f1"] > 0).all()
    training = pd.read_json(workdir / "metrics.jsonl", lines=True)["train/wall_s"].iloc[-1]
    assert results["fit_seconds"][0] == pytest.approx(training)  # the model's row: its training time
    out = capsys.readouterr().out
    assert "fit_seconds" in out and "scVI(30) HVG(40)" in out and "skipped" not in out
    assert "baselines (eval.baselines): PCA(8) log1p" in (tmp_path / "first" / "results.md").read_text()

    cached = sorted((workdir / CACHE_DIR).glob("scvi_*.npz"))
    assert len(cached) == 2 and not list((workdir / CACHE_DIR).glob("hvg_*"))  # val and test; slicing: no cache
    first = {p.name: np.load(p)["embedding"] for p in cached}
    again = evaluate(str(workdir), tasks="knn", outdir=str(tmp_path / "again"))
    assert without_uncached_fit_times(again) == without_uncached_fit_times(rows)  # from the cache
    shutil.rmtree(workdir / CACHE_DIR)
    refit = evaluate(str(workdir), tasks="knn", outdir=str(tmp_path / "refit"))
    for name, embedding in first.items():  # a second fit with the seed: the same embedding
        np.testing.assert_array_equal(np.load(workdir / CACHE_DIR / name)["embedding"], embedding)
    assert [r["knn_macro_f1"] for r in refit] == [r["knn_macro_f1"] for r in rows]


@pytest.mark.slow
def test_without_scvi_tools_scvi_is_skipped_and_the_others_are_scored(run, tmp_path, capsys, monkeypatch):
    workdir, _ = run
    copy = tmp_path / "run"  # no cached scVI embeddings
    shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(CACHE_DIR))
    monkeypatch.setitem(sys.modules, "scvi", None)  # `import scvi` raises ImportError
    rows = evaluate(str(copy), tasks="knn", baselines="pca,scvi")
    assert [r["method"] for r in rows] == ["sscell masked (step 20)", "PCA(8) log1p"]
    assert all(r["knn_macro_f1"] > 0 for r in rows)
    assert SKIP_LINE in capsys.readouterr().out
    assert SKIP_LINE in (copy / "results.md").read_text() and SKIP_LINE in (copy / "per_class_f1.md").read_text()


@pytest.mark.slow
def test_integration_leaves_out_gene_space_embeddings(run, tmp_path, capsys, monkeypatch):
    workdir, _ = run
    monkeypatch.setattr(integration_task, "MAX_DIMS", 39)  # the HVG baseline's 40 genes are too many
    rows = evaluate(str(workdir), tasks="integration", baselines="pca,hvg", outdir=str(tmp_path))
    assert [r["method"] for r in rows] == ["sscell masked (step 20)", "PCA(8) log1p", "HVG(40) log1p"]
    assert [any(k.startswith("scib_") for k in r) for r in rows] == [True, True, False]
    assert "integration: HVG(40) log1p not scored: more than 39 dimensions" in capsys.readouterr().out
    assert set(pd.read_csv(tmp_path / "integration.csv")["method"]) == {r["method"] for r in rows[:2]}
