"""The evaluation of a tiny trained run end to end, and embeddings of an .h5ad / a store written as AnnData."""
import csv
import importlib.util
import re

import anndata
import numpy as np
import pytest
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier

from sscell.config import default_config, save_config
from sscell.data.store import open_store
from sscell.embed import OBSM_KEY, embed
from sscell.errors import SscellError
from sscell.evaluation.cells import Evaluator
from sscell.evaluation.evaluate import eval_settings, evaluate
from sscell.evaluation.run import open_run
from sscell.training.train import build, train

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained_run(tiny_store, tmp_path_factory):
    """A run trained 30 steps on the tiny store (tiny_config's settings), with its config saved."""
    config = default_config()
    config.data.store = tiny_store.path
    config.model.update(hidden=(32, 32), latent=8)
    config.train.update(steps=30, batch_size=64, log_every=5, val_every=10, val_batches=2, checkpoint_every=10,
                        lr_decay_epochs=100)
    config.eval.update(batch_size=128, pca_components=8, hvg_genes=48, integration_cells=400, umap_cells=400,
                       scvi_epochs=3)
    workdir = tmp_path_factory.mktemp("run")
    train(config, str(workdir), tiny_store)
    save_config(config, workdir)
    return workdir, config


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_every_task_writes_sane_outputs(trained_run, capsys):
    workdir, _ = trained_run
    rows = evaluate(str(workdir))
    scvi = importlib.util.find_spec("scvi") is not None  # CI's newest-releases check installs no extras
    assert [r["method"] for r in rows] == ["sscell masked (step 30)", "PCA(8) log1p", "PCA(8) HVG(48)",
                                           "HVG(48) log1p"] + (["scVI(30) HVG(48)"] if scvi else [])
    written = read_csv(workdir / "results.csv")
    assert [r["method"] for r in written] == [r["method"] for r in rows]
    for row in rows:
        for task in ("knn", "probe"):
            for score in ("macro_f1", "micro_f1", "macro_f1_ontology", "micro_f1_ontology"):
                assert 0 < row[f"{task}_{score}"] <= 1, (row["method"], task, score)
            assert row[f"{task}_macro_f1_ontology"] >= row[f"{task}_macro_f1"] - 1e-12
        for key in ("donor", "dataset"):
            assert all(0 <= row[f"scib_{key}_{a}"] <= 1 for a in ("bio", "batch", "total"))
    for row in rows[:2]:  # the model and PCA reconstruct; the other baselines do not
        assert all(np.isfinite(row[f"recon_{p}{k}"]) and row[f"recon_{p}{k}"] <= 1
                   for p in ("", "masked_") for k in ("ev_weighted", "ev_uniform"))
        assert row["recon_mse"] > 0 and row["recon_masked_mse"] > 0
    assert rows[1]["recon_ev_weighted"] > 0  # PCA's projection explains variance on the cells it did not see
    assert not any(k.startswith("recon_") for row in rows[2:] for k in row)
    assert all(row["fit_seconds"] > 0 for row in rows)
    per_class = read_csv(workdir / "per_class_f1.csv")
    assert len(per_class) >= 2 and all(0 <= float(v) <= 1 for r in per_class for k, v in r.items()
                                       if k.startswith(("knn", "probe")))
    start, stop = open_store(trained_run[1].data.store).split_range("test")
    assert sum(int(r["test_cells"]) for r in per_class) == stop - start
    integration = read_csv(workdir / "integration.csv")
    assert {r["batch"] for r in integration} == {"donor", "dataset"} and len(integration) == 2 * len(rows)
    for name in ("umap_cell_type.png", "umap_batch.png", "loss_curve.png",
                 *(f"bars_{t}.png" for t in ("knn", "linear_probe", "reconstruction", "integration"))):
        assert (workdir / name).read_bytes().startswith(PNG), name
    out = capsys.readouterr().out
    assert "knn_macro_f1" in out and "results.md" in out and ("scVI skipped" in out) != scvi


def test_selected_tasks_only(trained_run):
    workdir, _ = trained_run
    rows = evaluate(str(workdir), tasks="knn")
    assert all("knn_macro_f1" in r and not any(k.startswith(("probe", "recon", "scib")) for k in r) for r in rows)


def test_progress_per_task_and_the_summary_names_only_what_ran(trained_run, tmp_path, capsys):
    workdir, _ = trained_run
    evaluate(str(workdir), tasks="knn,finetune,crossmodal", baselines="pca", outdir=str(tmp_path))
    out = capsys.readouterr().out
    assert re.search(r"^eval: embedded \d+ val, \d+ test cells by 2 methods in \d+\.\d s$", out, re.M)
    assert re.search(r"^eval: knn ... \d+\.\d s$", out, re.M) and "eval: finetune ... not run" in out
    assert re.search(r"^Evaluated knn in \d+ s", out, re.M)
    assert ("not run: finetune (no finetune.csv yet: python -m sscell.evaluation.finetune writes it); "
            "crossmodal (no crossmodal.csv yet: python -m sscell.evaluation.crossmodal writes it)") in out


def sklearn_knn(ref, ref_labels, query, k=5):
    """scikit-learn's 5-NN predictions, with distance ties at the k-th neighbour (duplicated cells:
    scikit-learn's order among them is arbitrary) settled by reference order."""
    predicted = KNeighborsClassifier(k, algorithm="brute").fit(ref, ref_labels).predict(query)
    dist = ((query[:, None].astype(np.float64) - ref[None].astype(np.float64)) ** 2).sum(-1)
    order = np.argsort(dist, axis=1, kind="stable")
    nearest = np.take_along_axis(dist, order[:, k - 1:k + 1], axis=1)
    tied = np.flatnonzero(nearest[:, 0] == nearest[:, 1])
    votes = np.stack([np.bincount(row, minlength=ref_labels.max() + 1) for row in ref_labels[order[tied, :k]]])
    predicted[tied] = votes.argmax(axis=1)  # scikit-learn's rule: the smallest of the most-voted labels
    return predicted


@pytest.mark.parametrize("reference", ["val", "train", "train+val"])
def test_knn_reference_is_scikit_learns_classifier_on_the_embedded_cells(trained_run, capsys, reference):
    """Each kNN reference gives scikit-learn's 5-NN predictions for every method, fitted on that
    reference's cells as the evaluator embeds them (training cells: the first knn_reference_cells)."""
    workdir, config = trained_run
    n_train = 300  # fewer than the store's training cells: the cap takes effect
    config.eval.knn_reference_cells = n_train
    save_config(config, workdir)
    try:
        rows = evaluate(str(workdir), tasks="knn", knn_reference=reference)
    finally:
        config.eval.knn_reference_cells = 20_000
        save_config(config, workdir)

    store = open_store(config.data.store)
    assert store.split_range("train")[1] - store.split_range("train")[0] > n_train
    evaluator = Evaluator(open_run(workdir), store, eval_settings(config), rows[0]["method"], False)  # no cache
    cells = {"train": evaluator.cells("train", n_train), "val": evaluator.cells("val", 0),
             "test": evaluator.cells("test", 0)}
    parts = [cells[s] for s in reference.split("+")]
    truth = cells["test"].labels["cell_type"]
    for row in rows[:3]:
        m = row["method"]
        expected = sklearn_knn(np.concatenate([c.embeddings[m] for c in parts]),
                               np.concatenate([c.labels["cell_type"] for c in parts]), cells["test"].embeddings[m])
        assert row["knn_macro_f1"] == pytest.approx(f1_score(truth, expected, average="macro"), abs=1e-12), m
        assert row["knn_micro_f1"] == pytest.approx(f1_score(truth, expected, average="micro"), abs=1e-12), m
        assert row["knn_reference"] == reference and row["knn_reference_cells"] == sum(map(len, parts))
    written = read_csv(workdir / "results.csv")
    assert {(r["knn_reference"], int(r["knn_reference_cells"])) for r in written} == {(reference, sum(map(len, parts)))}
    assert f"(eval.knn_reference={reference})" in capsys.readouterr().out


def test_unknown_knn_reference_is_refused(trained_run):
    with pytest.raises(SscellError, match="unknown kNN reference 'test'; choose from val, train, train\\+val"):
        evaluate(str(trained_run[0]), tasks="knn", knn_reference="test")


@pytest.mark.slow
def test_embeddings_of_an_h5ad_and_of_the_store(trained_run, tiny_h5ad, tmp_path):
    workdir, config = trained_run
    atlas = anndata.read_h5ad(tiny_h5ad)
    store = open_store(config.data.store)
    from_store = embed(str(workdir), store.path, str(tmp_path / "store.h5ad"))
    from_h5ad = embed(str(workdir), tiny_h5ad, str(tmp_path / "atlas.h5ad"), batch_size=100)
    assert from_h5ad["cells"] == from_store["cells"] == atlas.n_obs and from_h5ad["step"] == 30
    by_h5ad, by_store = anndata.read_h5ad(tmp_path / "atlas.h5ad"), anndata.read_h5ad(tmp_path / "store.h5ad")
    assert by_h5ad.obs_names.tolist() == atlas.obs_names.tolist()  # the input's cells, in its order
    assert by_h5ad.obs.columns.tolist() == atlas.obs.columns.tolist()
    assert by_h5ad.obsm[OBSM_KEY].shape == (atlas.n_obs, 8) and by_h5ad.uns["sscell"]["step"] == 30
    np.testing.assert_allclose(by_h5ad.obsm[OBSM_KEY], by_store[atlas.obs_names].obsm[OBSM_KEY], rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atlas.h5ad", "store.h5ad"]  # no temporary left

    # Genes the file lacks are unmeasured: zeroed before normalising, as in training.
    kept = atlas.var_names[10:][::-1]  # 10 vocabulary genes missing, the rest in another order
    partial = atlas[:300, kept].copy()
    partial.write_h5ad(tmp_path / "partial.h5ad")
    summary = embed(str(workdir), str(tmp_path / "partial.h5ad"), str(tmp_path / "partial_emb.h5ad"))
    assert summary["genes_not_measured"] == 10 and summary["genes_dropped"] == 0
    counts = np.zeros((300, atlas.n_vars))
    counts[:, 10:] = atlas[:300].X.toarray()[:, 10:]
    library = counts.sum(1, keepdims=True)
    x = np.log1p(counts / np.maximum(library, 1) * 1e4).astype(np.float32)  # a cell left without counts stays 0
    model = build(config, store).model  # the training-time model
    expected = np.asarray(model.apply({"params": open_run(workdir).params}, x, method="encode"))
    written = anndata.read_h5ad(tmp_path / "partial_emb.h5ad").obsm[OBSM_KEY]
    np.testing.assert_allclose(written, expected, rtol=1e-4, atol=1e-4)
