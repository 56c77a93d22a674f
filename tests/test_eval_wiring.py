"""The evaluation's wiring, end to end: a store whose datasets measure different genes, a trained
run, `evaluate`'s results.csv recomputed independently (numpy / scikit-learn) from the run's saved
embeddings, its parameters and the store's counts."""
import anndata
import jax
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier

from sscell.config import default_config, save_config
from sscell.data.convert import convert
from sscell.data.loader import label_codes
from sscell.data.store import open_store
from sscell.embed import embed
from sscell.evaluation.evaluate import evaluate
from sscell.evaluation.run import open_run
from sscell.losses.masking import random_gene_mask
from sscell.training.train import build, train

pytestmark = pytest.mark.slow

N_SHARED = 64  # genes both datasets measured; each also measured 16 the other did not


@pytest.fixture(scope="module")
def run(tiny_h5ad, tmp_path_factory):
    """A masked-autoencoder run on a store converted from two files measuring different genes,
    evaluated with kNN and reconstruction; returns (workdir, config, store, results row)."""
    folder = tmp_path_factory.mktemp("wiring")
    atlas = anndata.read_h5ad(tiny_h5ad)
    genes = atlas.var_names
    first = atlas[atlas.obs["dataset_id"] == "dataset_0", genes[:N_SHARED + 16]]
    second = atlas[atlas.obs["dataset_id"] == "dataset_1", genes[16:]]
    paths = [str(folder / "first.h5ad"), str(folder / "second.h5ad")]
    first.write_h5ad(paths[0])
    second.write_h5ad(paths[1])
    convert(paths, str(folder / "store"), seed=0)
    store = open_store(folder / "store")

    config = default_config()
    config.data.store = store.path
    config.model.update(hidden=(32, 32), latent=8, dtype="float32")
    config.train.update(steps=30, batch_size=64, log_every=10, val_every=10, val_batches=2, checkpoint_every=10,
                        lr_decay_epochs=100)
    config.eval.update(batch_size=1024, pca_components=8, tasks=("knn", "reconstruction"))
    workdir = folder / "run"
    workdir.mkdir()
    save_config(config, workdir)
    train(config, str(workdir), store)
    evaluate(str(workdir))
    results = pd.read_csv(workdir / "results.csv")
    return str(workdir), config, store, results[results["method"].str.startswith("sscell")].iloc[0]


def split_rows(store, split):
    start, stop = store.split_range(split)
    return np.arange(start, stop)


def test_the_datasets_measure_different_genes_and_the_splits_span_them(run):
    _, _, store, _ = run
    measured = np.asarray(store.measured, bool)
    assert measured.shape == (2, N_SHARED + 32) and (measured.sum(1) == N_SHARED + 16).all()
    assert (measured[0] != measured[1]).sum() == 32
    datasets = label_codes(store, 0, store.n_cells)["dataset"]
    # reference and query come from datasets with other genes: a wiring slip shows in the scores
    assert set(datasets[split_rows(store, "val")]) != set(datasets[split_rows(store, "test")])


def test_knn_scores_are_scikit_learn_on_the_saved_embeddings(run, tmp_path):
    workdir, _, store, row = run
    embed(workdir, store.path, str(tmp_path / "embedded.h5ad"))
    z = anndata.read_h5ad(tmp_path / "embedded.h5ad").obsm["X_sscell"].astype(np.float64)
    types = label_codes(store, 0, store.n_cells)["cell_type"]
    val, test = split_rows(store, "val"), split_rows(store, "test")
    # numpy: the 5 nearest validation cells of each test cell (equal distances: the lower store row
    # first, as documented), majority vote with ties to the smallest label
    distances = np.sqrt(((z[test][:, None, :] - z[val][None, :, :]) ** 2).sum(-1))
    nearest = np.argsort(distances, axis=1, kind="stable")[:, :5]
    votes = np.zeros((len(test), types.max() + 1), int)
    np.add.at(votes, (np.arange(len(test))[:, None], types[val][nearest]), 1)
    predicted = votes.argmax(1)
    # scikit-learn agrees wherever the 5th and 6th neighbours are not tied (its order among ties is its own)
    ordered = np.sort(distances, axis=1)
    clear = ordered[:, 4] < ordered[:, 5]
    assert clear.mean() > 0.8
    sklearn = KNeighborsClassifier(n_neighbors=5).fit(z[val], types[val]).predict(z[test])
    np.testing.assert_array_equal(predicted[clear], sklearn[clear])
    true = types[test]
    assert row["knn_macro_f1"] == pytest.approx(f1_score(true, predicted, average="macro"), abs=1e-12)
    assert row["knn_macro_f1_true_classes"] == pytest.approx(
        f1_score(true, predicted, labels=np.unique(true), average="macro"), abs=1e-12)
    assert row["knn_micro_f1"] == pytest.approx(np.mean(true == predicted), abs=1e-12)


def weighted_ev(x, x_hat, scored):
    """1 - sum_g Var(residual_g) / sum_g Var(x_g) over each gene's scored cells, genes whose x varies
    (torchmetrics' variance_weighted per gene's own cells)."""
    var_x, var_r = [], []
    for g in range(x.shape[1]):
        cells = scored[:, g]
        if cells.sum() and np.var(x[cells, g]) > 0:
            var_x.append(np.var(x[cells, g]))
            var_r.append(np.var(x[cells, g] - x_hat[cells, g]))
    return 1 - np.sum(var_r) / np.sum(var_x)


def test_reconstruction_scores_are_numpy_on_the_measured_and_hidden_genes(run):
    workdir, config, store, row = run
    start, stop = store.split_range("test")
    counts = store.read_rows(start, stop).toarray().astype(np.float64)
    measured = np.asarray(store.measured, bool)[label_codes(store, start, stop)["dataset"]]
    assert (counts[~measured] == 0).all() and (~measured).any()
    kept = np.where(measured, counts, 0.0)
    x = np.log1p(kept / kept.sum(1, keepdims=True) * 1e4)
    model, params = build(config, store).model, open_run(workdir).params  # the training-time model

    def reconstruct(inputs):
        return np.asarray(model.apply({"params": params}, inputs.astype(np.float32), measured,
                                            method="reconstruct"), np.float64)

    x_hat = reconstruct(x)
    assert row["recon_ev_weighted"] == pytest.approx(weighted_ev(x, x_hat, measured), abs=1e-5)
    # the test cells' dataset did not measure some genes at all: constant there, so EV alone would not
    # see them scored; the MSE does
    assert row["recon_mse"] == pytest.approx(np.mean((x - x_hat)[measured] ** 2), rel=1e-5)
    # the seeded hidden genes: the evaluation's one batch (eval.batch_size >= test cells) starts at row `start`
    rate = config.eval.mask_rate
    key = jax.random.fold_in(jax.random.key(config.seed), start)
    hidden = np.asarray(random_gene_mask(key, (config.eval.batch_size, store.n_genes), rate))[:stop - start] & measured
    shown = np.where(hidden, 0.0, x / (1 - rate))
    x_hat = reconstruct(shown)
    assert row["recon_masked_ev_weighted"] == pytest.approx(weighted_ev(x, x_hat, hidden), abs=1e-5)
    assert row["recon_masked_mse"] == pytest.approx(np.mean((x - x_hat)[hidden] ** 2), rel=1e-5)
