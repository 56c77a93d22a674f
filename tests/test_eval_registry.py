"""Evaluation tasks as a registry: the docs' example task through the command, tasks that need no
checkpoint, the baselines' cache, and `open_run`'s parameters against a full train-state restore."""
import os
import re
import subprocess
import sys
from pathlib import Path

import anndata
import jax
import numpy as np
import pandas as pd
import pytest
from conftest import train_tiny_run  # tests/ is on sys.path (rootdir conftest)

from sscell.config import save_config
from sscell.data.loader import label_codes
from sscell.embed import embed
from sscell.errors import SscellError
from sscell.evaluation.baselines import load_baselines
from sscell.evaluation.cells import BaselineCache, Evaluator
from sscell.evaluation.evaluate import CACHE_DIR, eval_settings, evaluate
from sscell.evaluation.run import open_run
from sscell.training import checkpoint
from sscell.training.mesh import make_mesh, replicated
from sscell.training.state import abstract_state
from sscell.training.train import build

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = "sscell.evaluation.example_task"


@pytest.fixture(scope="module")
def run(tiny_store, tmp_path_factory):
    """A run trained 20 steps on the tiny store that names the example task module."""
    workdir = tmp_path_factory.mktemp("registry")
    return workdir, train_tiny_run(tiny_store, workdir, hvg_genes=48, module=EXAMPLE,
                                             baselines=("pca", "pca_hvg"))


@pytest.mark.slow
def test_the_example_task_runs_through_the_command_and_matches_numpy(run, tiny_store, tmp_path):
    workdir, _ = run
    done = subprocess.run([sys.executable, "-m", "sscell.evaluation", f"--workdir={workdir}",
                           "--tasks=nearest_neighbour", f"--eval_module={EXAMPLE}"], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    assert "| method | nn_accuracy |" in done.stdout  # the headline summary
    results = pd.read_csv(workdir / "results.csv")
    assert list(results.columns) == ["method", "fit_seconds", "nn_accuracy"] and len(results) == 3
    # numpy: the model's embeddings (the embed command), each test cell takes its nearest validation cell's type
    embed(str(workdir), tiny_store.path, str(tmp_path / "embedded.h5ad"))
    z = anndata.read_h5ad(tmp_path / "embedded.h5ad").obsm["X_sscell"].astype(np.float64)
    types = label_codes(tiny_store, 0, tiny_store.n_cells)["cell_type"]
    (v0, v1), (t0, t1) = tiny_store.split_range("val"), tiny_store.split_range("test")
    distances = ((z[t0:t1, None] - z[None, v0:v1]) ** 2).sum(-1)
    ordered = np.sort(distances, 1)
    tied = (ordered[:, 0] == ordered[:, 1]).sum()  # where scikit-learn may choose another nearest cell
    expected = np.mean(types[v0:v1][distances.argmin(1)] == types[t0:t1])
    assert abs(results["nn_accuracy"][0] - expected) <= tied / (t1 - t0) + 1e-6
    assert 0.3 < expected <= 1


def test_the_docs_show_the_example_module_as_it_is():
    page = (ROOT / "docs" / "extending.md").read_text()
    section = page[page.index("# Adding an evaluation task"):]
    shown = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert shown == (ROOT / "sscell" / "evaluation" / "example_task.py").read_text()


def test_unknown_tasks_and_modules_are_refused(run):
    workdir, _ = run
    with pytest.raises(SscellError, match=r"unknown evaluation task\(s\) silhouette; choose from knn, linear_probe"):
        evaluate(str(workdir), tasks="knn,silhouette", eval_module="")
    with pytest.raises(SscellError, match=r"cannot import eval.module 'no_such.tasks'"):
        evaluate(str(workdir), tasks="knn", eval_module="no_such.tasks")


def test_a_result_table_task_restores_no_checkpoint(run, tmp_path):
    """finetune appends finetune.csv's rows; it needs no embeddings, so a workdir without
    checkpoints evaluates (nothing to restore)."""
    _, config = run
    save_config(config, tmp_path)
    rows = [{"method": "fine-tuned from sscell masked", "label_fraction": 0.1, "finetune_macro_f1": 0.5}]
    pd.DataFrame(rows).to_csv(tmp_path / "finetune.csv", index=False)
    assert not (tmp_path / "checkpoints").exists()
    assert evaluate(str(tmp_path), eval_module=EXAMPLE, tasks="finetune") == rows
    assert pd.read_csv(tmp_path / "results.csv").to_dict("records") == rows
    with pytest.raises(SscellError, match="has no best checkpoint yet; train first"):
        evaluate(str(tmp_path), eval_module=EXAMPLE, tasks="finetune,knn")


@pytest.mark.slow
def test_the_baselines_cache_gives_what_a_fresh_embedding_gives(run, tiny_store, tmp_path):
    workdir, config = run
    settings = eval_settings(config)
    first = evaluate(str(workdir), eval_module=EXAMPLE, tasks="knn,reconstruction", outdir=str(tmp_path / "first"))
    cache = BaselineCache(workdir / CACHE_DIR, tiny_store, settings, config.seed)
    pca, pca_hvg = load_baselines(settings.baselines)
    test_file = cache.path(pca, "test", 0, True)
    assert test_file.exists() and cache.path(pca_hvg, "val", 0, False).exists()
    again = evaluate(str(workdir), eval_module=EXAMPLE, tasks="knn,reconstruction", outdir=str(tmp_path / "again"))
    assert again == first  # every score and fit time, from the cache

    fresh = Evaluator(open_run(workdir), tiny_store, settings, first[0]["method"], False)  # no cache
    for split in ("val", "test"):
        computed = fresh.cells(split, 0).embeddings
        for baseline in (pca, pca_hvg):  # the model's embedding is never cached
            cached = cache.read(baseline, split, 0, split == "test")
            np.testing.assert_array_equal(cached.embedding, computed[cached.method])
            if split == "val":  # the first split embedded: the rows' fit time (earlier tests may have cached it)
                assert cached.fit_seconds == next(r["fit_seconds"] for r in first if r["method"] == cached.method)

    test_file.write_bytes(b"not an npz")  # damaged: recomputed and rewritten
    third = evaluate(str(workdir), eval_module=EXAMPLE, tasks="knn,reconstruction", outdir=str(tmp_path / "third"))
    assert third == first
    assert cache.read(pca, "test", 0, True) is not None
    settings.pca_components = 4  # a setting PCA depends on: another file
    assert BaselineCache(workdir / CACHE_DIR, tiny_store, settings, config.seed).path(pca, "test", 0, True) != test_file
    settings.update(pca_components=8, scvi_epochs=1)  # one it does not depend on: the same file
    assert BaselineCache(workdir / CACHE_DIR, tiny_store, settings, config.seed).path(pca, "test", 0, True) == test_file


def test_open_run_restores_the_parameters_a_full_train_state_restore_gives(run, tiny_store):
    workdir, config = run
    opened = open_run(workdir, "latest")
    setup = build(config, tiny_store)
    manager = checkpoint.checkpoint_manager(workdir, config.train.checkpoint_every, config.train.keep_checkpoints)
    layout = abstract_state(setup.model, setup.optimizer, replicated(make_mesh(config.mesh)), setup.init_extra)
    state, _ = checkpoint.restore(manager, layout, "latest")
    manager.close()
    assert opened.step == int(state["step"]) == 20 and opened.store.path == tiny_store.path
    restored = jax.tree.leaves_with_path(state["params"])
    assert len(restored) == len(jax.tree.leaves(opened.params))
    for path, value in restored:
        leaf = opened.params
        for key in path:
            leaf = leaf[key.key]
        np.testing.assert_array_equal(leaf, np.asarray(value))
    assert type(opened.model) is type(setup.model) and opened.model == setup.model  # the same module


def test_identical_embeddings_are_scored_once_with_the_same_scores(run, tmp_path):
    """With no more genes than eval.hvg_genes, PCA of the HVGs is PCA of every gene: scored once,
    its row holds the PCA row's embedding scores (and no reconstruction: it does not reconstruct)."""
    workdir, config = run
    config.eval.hvg_genes = 1000  # > the store's 96 genes
    save_config(config, workdir)
    try:
        rows = evaluate(str(workdir), eval_module=EXAMPLE, tasks="knn,linear_probe,reconstruction", outdir=str(tmp_path))
    finally:
        config.eval.hvg_genes = 48
        save_config(config, workdir)
    pca, hvg = rows[1], rows[2]
    assert (pca["method"], hvg["method"]) == ("PCA(8) log1p", "PCA(8) HVG(96)")
    assert {k: v for k, v in hvg.items() if k not in ("method", "fit_seconds")} == {
        k: v for k, v in pca.items() if k not in ("method", "fit_seconds") and not k.startswith("recon_")}
    assert "recon_ev_weighted" in pca and pca["probe_macro_f1"] > 0
