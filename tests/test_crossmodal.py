"""Cross-modality prediction: its metrics, the protein_regression task and the pretrained-vs-scratch-vs-ridge run."""
import json

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.stats
from sklearn.linear_model import RidgeCV

from sscell.config import default_config, load_config, save_config
from sscell.data.loader import label_codes, select_rows
from sscell.data.modality import PROTEIN_KEY
from sscell.errors import SscellError
from sscell.evaluation.crossmodal import RESULTS, RIDGE_ALPHAS, crossmodal, crossmodal_config
from sscell.evaluation.metrics import correlation_scores
from sscell.training.train import train

TINY_TRAIN = {"batch_size": 64, "log_every": 5, "val_every": 10, "val_batches": 2, "checkpoint_every": 10}


def test_correlation_scores_match_scipy_and_skip_constant_rows():
    rng = np.random.default_rng(0)
    true = rng.poisson(3.0, (40, 6)).astype(float)
    predicted = true + rng.normal(0.0, 1.5, true.shape)
    true[7] = 2.0  # a constant cell: no correlation, left out of the means
    scores = correlation_scores(true, predicted)
    per_cell = [scipy.stats.pearsonr(t, p)[0] for i, (t, p) in enumerate(zip(true, predicted)) if i != 7]
    per_cell_rank = [scipy.stats.spearmanr(t, p)[0] for i, (t, p) in enumerate(zip(true, predicted)) if i != 7]
    assert scores["pearson_cell"] == pytest.approx(np.mean(per_cell))
    assert scores["spearman_cell"] == pytest.approx(np.mean(per_cell_rank))
    assert scores["pearson_feature"] == pytest.approx(np.mean([scipy.stats.pearsonr(true[:, j], predicted[:, j])[0]
                                                                for j in range(6)]))
    assert scores["spearman_feature"] == pytest.approx(np.mean([scipy.stats.spearmanr(true[:, j], predicted[:, j])[0]
                                                                 for j in range(6)]))
    assert scores["pearson_all"] == pytest.approx(scipy.stats.pearsonr(true.ravel(), predicted.ravel())[0])
    assert scores["spearman_all"] == pytest.approx(scipy.stats.spearmanr(true.ravel(), predicted.ravel())[0])
    assert scores["mse"] == pytest.approx(np.mean((true - predicted) ** 2))
    with pytest.raises(SscellError, match="two equal"):
        correlation_scores(true, predicted[:, :5])


def tiny(config, store, steps):
    config.data.store = store.path
    config.model.update(hidden=(32, 32), latent=8)
    config.train.update(steps=steps, lr_decay_epochs=100, **TINY_TRAIN)
    config.eval.batch_size = 128
    return config


@pytest.fixture(scope="module")
def pretrained(tiny_protein_store, tmp_path_factory):
    """A tiny masked-autoencoder run on dataset_1's RNA (dataset_0 is the held-out batch)."""
    config = tiny(default_config(), tiny_protein_store, 30)
    config.data.train_datasets = ("dataset_1",)
    workdir = str(tmp_path_factory.mktemp("pretrained"))
    save_config(config, workdir)
    train(config, workdir, tiny_protein_store)
    return workdir


def independent_ridge(store, atlas, train_rows, rows):
    """RidgeCV predictions for `rows`, rebuilt from the store's counts and the .h5ad's proteins by cell id."""
    ids, datasets = store.read_obs().index, label_codes(store, 0, store.n_cells)["dataset"]

    def features(r):
        counts = store.read_blocks([(int(i), int(i) + 1) for i in r])
        x = np.log1p(np.vstack([c.toarray() for c in counts]) / np.vstack([c.sum() for c in counts]) * 1e4)
        return np.hstack([x, np.eye(len(store.datasets))[datasets[r]]])

    targets = np.log1p(atlas.obsm[PROTEIN_KEY][atlas.obs_names.get_indexer(ids[train_rows])])
    truth = np.log1p(atlas.obsm[PROTEIN_KEY][atlas.obs_names.get_indexer(ids[rows])])
    return truth, RidgeCV(alphas=RIDGE_ALPHAS).fit(features(train_rows), targets).predict(features(rows))


@pytest.mark.slow
def test_pretrained_vs_scratch_vs_ridge_end_to_end(pretrained, tiny_protein_store, tiny_protein_h5ad, capsys):
    store = tiny_protein_store
    base = tiny(crossmodal_config(), store, 20)
    base.data.train_datasets = ("dataset_1",)
    rows = crossmodal(pretrained, fractions=[1.0], base=base)
    assert capsys.readouterr().out.count(f"encoder initialised from {pretrained} (step 30") == 1

    train_rows = select_rows(store, "train", datasets=("dataset_1",))
    assert [(r["method"], r["train_cells"]) for r in rows] == [
        ("fine-tuned from sscell masked", len(train_rows)), ("trained from scratch", len(train_rows)),
        ("ridge regression", len(train_rows))]
    for row in rows:
        for key in ("id_pearson_cell", "ood_pearson_cell", "id_spearman_feature", "ood_pearson_all"):
            assert -1 <= row[key] <= 1
        assert row["id_mse"] > 0 and row["ood_mse"] > 0
    for arm, init_from in (("pretrained", pretrained), ("scratch", "")):
        saved = load_config(f"{pretrained}/{RESULTS}/{arm}_1")
        assert saved.loss.name == "protein_regression" and saved.data.modality == PROTEIN_KEY
        assert saved.train.init_from == init_from and list(saved.data.train_datasets) == ["dataset_1"]
        with open(f"{pretrained}/{RESULTS}/{arm}_1/metrics.jsonl") as f:
            assert json.loads(f.readlines()[-1])["step"] == 20

    # The ridge row equals a ridge rebuilt independently: counts read per cell, proteins from the
    # .h5ad by cell id; ID = dataset_1's test cells, OOD = every dataset_0 cell.
    atlas = anndata.read_h5ad(tiny_protein_h5ad)
    labels = store.labels
    id_rows = np.flatnonzero((labels["split"] == "test") & (labels["dataset_id"] == "dataset_1"))
    ood_rows = np.flatnonzero(labels["dataset_id"] == "dataset_0")
    per_protein = pd.read_csv(f"{pretrained}/{RESULTS}_per_protein.csv")
    assert list(per_protein["protein"]) == list(atlas.uns[f"{PROTEIN_KEY}_names"])
    for name, rows_ in (("id", id_rows), ("ood", ood_rows)):
        truth, predicted = independent_ridge(store, atlas, train_rows, rows_)
        for key, value in correlation_scores(truth, predicted).items():
            assert rows[2][f"{name}_{key}"] == pytest.approx(value, rel=1e-3, abs=1e-4)
        np.testing.assert_allclose(per_protein[f"{name}: ridge regression (1)"],
                                   [np.corrcoef(truth[:, j], predicted[:, j])[0, 1] for j in range(8)], rtol=1e-3)
    assert rows[2]["id_pearson_cell"] > 0.8  # proteins are learnable from RNA

    # Rerunning finds every arm trained and only scores again; the table is on disk.
    assert crossmodal(pretrained, fractions=[1.0], base=base) == rows
    assert "training already complete at step 20" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(f"{pretrained}/{RESULTS}.csv"), pd.DataFrame(rows),
                                  check_dtype=False)


def test_a_store_without_proteins_is_refused_in_one_line(tiny_store, tmp_path):
    config = tiny(crossmodal_config(), tiny_store, 2)
    with pytest.raises(SscellError, match="has no obsm\\['protein_counts'\\]"):
        train(config, str(tmp_path / "run"), tiny_store)
    config.data.modality = ""
    with pytest.raises(SscellError, match="set data.modality"):
        train(config, str(tmp_path / "run2"), tiny_store)
