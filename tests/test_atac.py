"""ATAC peaks as a sparse second modality: generated, converted, appended, loaded, TF-IDF'd in jit,
and predicted from RNA fine-tuned vs from scratch vs ridge."""
import dataclasses

import anndata
import jax
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import TINY_ATAC_ATLAS  # tests/ is on sys.path (rootdir conftest)
from sklearn.linear_model import RidgeCV

from sscell.config import default_config, load_config, save_config
from sscell.data.convert import convert
from sscell.data.loader import CellLoader, label_codes, nnz_bucket, select_rows
from sscell.data.modality import ATAC_KEY, SparseModalityReader, open_modality
from sscell.data.preprocess import PEAK_FIELDS
from sscell.data.split_features import split_feature_types
from sscell.data.store import open_store
from sscell.data.synthetic import generate_atlas, write_atlas
from sscell.data.task_data import task_info
from sscell.errors import SscellError
from sscell.evaluation.crossmodal import RIDGE_ALPHAS, crossmodal, crossmodal_config
from sscell.evaluation.metrics import correlation_scores
from sscell.losses import load_task
from sscell.training.step import task_batch
from sscell.training.train import train

TINY_TRAIN = {"batch_size": 64, "log_every": 5, "val_every": 10, "val_batches": 2, "checkpoint_every": 10}


@pytest.fixture(scope="module")
def atlas(tiny_atac_h5ad):
    return anndata.read_h5ad(tiny_atac_h5ad)


@pytest.fixture(scope="module")
def store(tiny_atac_store):
    return tiny_atac_store


def peaks_of(atlas, ids) -> np.ndarray:
    """The input's dense peak rows of the given cell ids (the independent expectation)."""
    return atlas.obsm[ATAC_KEY][atlas.obs_names.get_indexer(ids)].toarray()


def reference_tfidf(peaks: np.ndarray, train_peaks: np.ndarray) -> np.ndarray:
    """LSI TF-IDF written out in numpy: log1p(1e4 * counts / total * log(1 + n / max(df, 1)))."""
    idf = np.log(1 + len(train_peaks) / np.maximum((train_peaks > 0).sum(0), 1))
    total = peaks.sum(1, keepdims=True)
    return np.log1p(1e4 * np.divide(peaks, total, out=np.zeros_like(peaks), where=total > 0) * idf)


def test_generated_peaks_are_sparse_binaryish_programme_driven_and_leave_the_rna_unchanged(atlas, tiny_h5ad):
    plain = anndata.read_h5ad(tiny_h5ad)  # the same spec without peaks
    assert (plain.X != atlas.X).nnz == 0 and not plain.obsm
    peaks, names = atlas.obsm[ATAC_KEY], list(atlas.uns[f"{ATAC_KEY}_names"])
    assert sp.issparse(peaks) and peaks.shape == (atlas.n_obs, 60) and len(set(names)) == 60
    assert 0.02 < peaks.nnz / np.prod(peaks.shape) < 0.4 and (peaks.data == 1).mean() > 0.6
    assert (generate_atlas(TINY_ATAC_ATLAS).obsm[ATAC_KEY] != peaks).nnz == 0  # streamed = in memory
    # Accessibility marks cell types: the share of each peak's variance between cell types.
    open_ = (peaks.toarray() > 0).astype(float)
    types = atlas.obs["cell_type"].cat.codes.to_numpy()
    means = np.stack([open_[types == t].mean(0) for t in range(types.max() + 1)])
    explained = ((means[types] - open_.mean(0)) ** 2).sum(0) / np.maximum(((open_ - open_.mean(0)) ** 2).sum(0), 1e-9)
    # ~0.006 if peaks ignored cell types (10 types, 1,600 cells); peaks of cell-state programmes and
    # background peaks do ignore them
    assert (explained > 0.1).mean() > 0.25, explained
    with pytest.raises(SscellError, match="not both"):
        write_atlas(dataclasses.replace(TINY_ATAC_ATLAS, n_proteins=4), "unused.h5ad")


def test_conversion_and_append_keep_each_cells_peaks(atlas, store, tmp_path):
    reader = open_modality(store, ATAC_KEY)
    ids = store.read_obs().index
    assert isinstance(reader, SparseModalityReader) and reader.names == tuple(atlas.uns[f"{ATAC_KEY}_names"])
    assert not (ids == atlas.obs_names).all()  # the rows were shuffled
    np.testing.assert_array_equal(reader.read([(0, store.n_cells)]), peaks_of(atlas, ids))
    stored = anndata.read_zarr(store.path)  # anndata reads the CSR obsm back too
    assert sp.issparse(stored.obsm[ATAC_KEY])
    np.testing.assert_array_equal(stored.obsm[ATAC_KEY].toarray(), peaks_of(atlas, ids))
    np.testing.assert_array_equal(stored.X.toarray(), atlas[ids].X.toarray())

    first, second = (atlas[atlas.obs["dataset_id"] == d].copy() for d in ("dataset_0", "dataset_1"))
    first.write_h5ad(tmp_path / "first.h5ad")
    second.write_h5ad(tmp_path / "second.h5ad")
    convert([tmp_path / "first.h5ad"], tmp_path / "store", block_cells=200, bucket_nonzeros=3000)
    convert([tmp_path / "second.h5ad"], tmp_path / "store", append=True, block_cells=200, bucket_nonzeros=3000)
    appended = open_store(tmp_path / "store")
    merged_ids = appended.read_obs().index
    assert appended.n_cells == atlas.n_obs
    np.testing.assert_array_equal(open_modality(appended, ATAC_KEY).read([(0, appended.n_cells)]),
                                  peaks_of(atlas, merged_ids))


def test_loader_ships_flat_peaks_aligned_with_the_rows_and_resumes_exactly(atlas, store):
    ids = store.read_obs().index
    loader = CellLoader(store, "train", 64, 3, shards=2, modality=ATAC_KEY)
    reader = open_modality(store, ATAC_KEY)
    sizes = set()
    for step in range(loader.steps_per_epoch):
        batch = loader.batch(step)
        assert batch["peaks"].shape[0] == 2 and batch["peak_indptr"].shape == (2, 33)
        sizes.add(batch["peaks"].shape[1])
        dense = np.zeros((64, 60), np.float32)
        for s in range(2):
            indptr = batch["peak_indptr"][s]
            for i in range(32):
                part = slice(indptr[i], indptr[i + 1])
                dense[32 * s + i, batch["peaks"][s, part]] = batch["peak_counts"][s, part]
        np.testing.assert_array_equal(dense, peaks_of(atlas, ids[batch["cell"]]))
    # one padded size per epoch: the fullest shard's nonzeros, bucketed
    rows = loader.rows[np.concatenate([loader.selection(s) for s in range(loader.steps_per_epoch)])]
    assert sizes == {nnz_bucket(reader.lengths(rows).reshape(-1, 32).sum(1).max())}
    resumed = CellLoader(store, "train", 64, 3, shards=2, modality=ATAC_KEY).batch(5)
    for name, values in loader.batch(5).items():
        np.testing.assert_array_equal(resumed[name], values)


@pytest.mark.slow
def test_tfidf_target_and_loss_match_numpy(atlas, store):
    config = default_config()
    config.data.update(store=store.path, modality=ATAC_KEY, train_datasets=("dataset_1",))
    config.loss.name = "atac_regression"
    config.model.update(hidden=(16,), latent=4)
    task = load_task(config.loss)
    info = task_info(config, store)
    ids = store.read_obs().index
    train_peaks = peaks_of(atlas, ids[select_rows(store, "train", datasets=("dataset_1",))])
    idf = np.log(1 + len(train_peaks) / np.maximum((train_peaks > 0).sum(0), 1))
    np.testing.assert_allclose(info.modality_idf, idf, rtol=1e-6)

    model = task.build_model(config, info)
    batch = CellLoader(store, "train", 64, 0, shards=2, modality=ATAC_KEY).batch(0)
    loss_batch = task_batch(batch, store.n_genes, info.measured_table())
    assert all(f in loss_batch for f in PEAK_FIELDS)  # the peak fields reach the loss as they are
    params = model.init(jax.random.key(0), loss_batch["x"], loss_batch["dataset"])["params"]
    loss, metrics = task.loss(params, loss_batch, jax.random.key(1), model=model, config=config.loss, train=False,
                              info=info)
    predicted = np.asarray(model.apply({"params": params}, loss_batch["x"], loss_batch["dataset"]))
    target = reference_tfidf(peaks_of(atlas, ids[batch["cell"]]), train_peaks)
    assert float(loss) == pytest.approx(np.mean((predicted - target) ** 2), rel=1e-5)
    assert float(metrics["pearson_cell"]) == pytest.approx(
        np.mean([np.corrcoef(p, t)[0, 1] if t.std() > 0 else 0.0 for p, t in zip(predicted, target)]), rel=1e-4)

    config.loss.name = "protein_regression"  # peaks for protein_regression, or no data.modality, are refused
    with pytest.raises(SscellError, match="predicts obsm\\['protein_counts'\\]"):
        load_task(config.loss).build_model(config, info)
    config.data.modality = ""
    with pytest.raises(SscellError, match="set data.modality"):
        task.build_model(config, task_info(config, store))


@pytest.mark.slow
def test_pretrained_vs_scratch_vs_ridge_end_to_end_on_peaks(atlas, store, tmp_path, capsys):
    pretrain = default_config()
    pretrain.data.update(store=store.path, train_datasets=("dataset_1",))
    pretrain.model.update(hidden=(32, 32), latent=8)
    pretrain.train.update(steps=20, lr_decay_epochs=100, **TINY_TRAIN)
    workdir = str(tmp_path)
    save_config(pretrain, workdir)
    train(pretrain, workdir, store)

    base = crossmodal_config(ATAC_KEY)
    base.data.update(store=store.path, train_datasets=("dataset_1",))
    base.model.update(hidden=(32, 32), latent=8)
    base.train.update(steps=20, lr_decay_epochs=100, **TINY_TRAIN)
    base.eval.batch_size = 128
    rows = crossmodal(workdir, fractions=[1.0], base=base)
    assert "Cross-modality prediction of 60 peaks" in capsys.readouterr().out
    train_rows = select_rows(store, "train", datasets=("dataset_1",))
    assert [(r["method"], r["train_cells"]) for r in rows] == [
        ("fine-tuned from sscell masked", len(train_rows)), ("trained from scratch", len(train_rows)),
        ("ridge regression", len(train_rows))]
    for arm in ("pretrained", "scratch"):
        saved = load_config(f"{workdir}/crossmodal_atac/{arm}_1")
        assert saved.loss.name == "atac_regression" and saved.data.modality == ATAC_KEY
    per_peak = pd.read_csv(f"{workdir}/crossmodal_atac_per_peak.csv")
    assert list(per_peak["peak"]) == list(atlas.uns[f"{ATAC_KEY}_names"])

    # The ridge row equals a ridge rebuilt independently: counts read per cell, TF-IDF of the
    # .h5ad's peaks by cell id; ID = dataset_1's test cells, OOD = every dataset_0 cell.
    ids, datasets = store.read_obs().index, label_codes(store, 0, store.n_cells)["dataset"]
    train_peaks = peaks_of(atlas, ids[train_rows])

    def features(r):
        counts = np.vstack([c.toarray() for c in store.read_blocks([(int(i), int(i) + 1) for i in r])])
        return np.hstack([np.log1p(counts / counts.sum(1, keepdims=True) * 1e4), np.eye(2)[datasets[r]]])

    ridge = RidgeCV(alphas=RIDGE_ALPHAS).fit(features(train_rows), reference_tfidf(train_peaks, train_peaks))
    labels = store.labels
    for name, r in (("id", np.flatnonzero((labels["split"] == "test") & (labels["dataset_id"] == "dataset_1"))),
                    ("ood", np.flatnonzero(labels["dataset_id"] == "dataset_0"))):
        truth = reference_tfidf(peaks_of(atlas, ids[r]), train_peaks)
        for key, value in correlation_scores(truth, ridge.predict(features(r))).items():
            assert rows[2][f"{name}_{key}"] == pytest.approx(value, rel=2e-3, abs=1e-4)
    assert rows[2]["id_pearson_cell"] > 0.3  # peaks are learnable from RNA


def test_multiome_file_is_split_into_rna_and_the_most_open_peaks(atlas, tmp_path):
    peaks, names = atlas.obsm[ATAC_KEY], list(atlas.uns[f"{ATAC_KEY}_names"])
    counts = sp.hstack([atlas.X, peaks]).tocsr()
    combined = anndata.AnnData(
        X=counts, obs=pd.DataFrame({"cell_type": atlas.obs["cell_type"], "batch": atlas.obs["dataset_id"].astype(str),
                                    "DonorID": atlas.obs["donor_id"]},
                                   index=atlas.obs_names),
        var=pd.DataFrame({"feature_types": ["GEX"] * atlas.n_vars + ["ATAC"] * len(names),
                          "gene_id": [*atlas.var_names, *names]}, index=[*atlas.var["feature_name"], *names]))
    combined.layers["counts"] = counts
    combined.write_h5ad(tmp_path / "multiome.h5ad")
    report = split_feature_types(tmp_path / "multiome.h5ad", tmp_path / "split.h5ad", n_hvg=0, protein="ATAC",
                                 top_features=20)
    split = anndata.read_h5ad(tmp_path / "split.h5ad")
    kept = np.sort(np.argsort(-peaks.getnnz(0), kind="stable")[:20])  # the 20 peaks open in most cells
    assert report["peaks"] == 20 and list(split.uns[f"{ATAC_KEY}_names"]) == [names[j] for j in kept]
    assert sp.issparse(split.obsm[ATAC_KEY]) and (split.obsm[ATAC_KEY] != peaks[:, kept]).nnz == 0
    assert (split.X != atlas.X).nnz == 0
    convert([tmp_path / "split.h5ad"], tmp_path / "store")
    assert open_modality(open_store(tmp_path / "store"), ATAC_KEY).n_features == 20
