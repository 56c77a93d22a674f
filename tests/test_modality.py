"""A second modality per cell (proteins): generated, converted, appended and loaded aligned with its cells."""
import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from sscell.data.convert import convert
from sscell.data.loader import CellLoader
from sscell.data.modality import PROTEIN_KEY, has_modality, open_modality
from sscell.data.preprocess import BATCH_FIELD
from sscell.data.split_features import split_feature_types
from sscell.data.store import open_store
from sscell.errors import SscellError


@pytest.fixture(scope="module")
def atlas(tiny_protein_h5ad):
    return anndata.read_h5ad(tiny_protein_h5ad)


def proteins_of(atlas, ids) -> np.ndarray:
    """The input's protein rows of the given cell ids (the independent expectation)."""
    return atlas.obsm[PROTEIN_KEY][atlas.obs_names.get_indexer(ids)]


def test_generated_proteins_follow_their_coding_gene_and_leave_the_rna_unchanged(atlas, tiny_h5ad):
    plain = anndata.read_h5ad(tiny_h5ad)  # the same spec without proteins
    assert (plain.X != atlas.X).nnz == 0 and not plain.obsm  # proteins draw from their own random streams
    proteins, names = atlas.obsm[PROTEIN_KEY], list(atlas.uns[f"{PROTEIN_KEY}_names"])
    assert proteins.shape == (atlas.n_obs, 8) and len(set(names)) == 8
    assert (proteins >= 0).all() and (proteins == np.round(proteins)).all()
    assert all(name.removesuffix("-protein") in set(atlas.var["feature_name"]) for name in names)  # coding genes
    # Proteins mark cell types: the share of each protein's variance between cell types (eta squared).
    logged = np.log1p(proteins)
    types = atlas.obs["cell_type"].cat.codes.to_numpy()
    means = np.stack([logged[types == t].mean(0) for t in range(types.max() + 1)])
    explained = ((means[types] - logged.mean(0)) ** 2).sum(0) / ((logged - logged.mean(0)) ** 2).sum(0)
    assert explained.min() > 0.1, explained  # ~0.006 if proteins ignored cell types (10 types, 1,600 cells)


def test_conversion_keeps_each_cells_proteins_through_the_shuffle(atlas, tiny_protein_store):
    store = tiny_protein_store
    reader = open_modality(store)
    ids = store.read_obs().index
    np.testing.assert_array_equal(reader.read([(0, store.n_cells)]), proteins_of(atlas, ids))
    assert reader.names == tuple(atlas.uns[f"{PROTEIN_KEY}_names"])
    assert not (ids == atlas.obs_names).all()  # the rows were shuffled
    stored = anndata.read_zarr(store.path)  # anndata reads the store's obsm and names too
    np.testing.assert_array_equal(stored.obsm[PROTEIN_KEY], proteins_of(atlas, ids))
    assert list(stored.uns[f"{PROTEIN_KEY}_names"]) == list(reader.names)


def test_append_carries_the_proteins_and_refuses_inputs_without_them(atlas, tiny_h5ad, tmp_path):
    first, second = (atlas[atlas.obs["dataset_id"] == d].copy() for d in ("dataset_0", "dataset_1"))
    first.write_h5ad(tmp_path / "first.h5ad")
    second.write_h5ad(tmp_path / "second.h5ad")
    convert([tmp_path / "first.h5ad"], tmp_path / "store", block_cells=200, bucket_nonzeros=3000)
    with pytest.raises(SscellError, match="has no obsm\\['protein_counts'\\] while"):
        convert([tiny_h5ad], tmp_path / "store", append=True)
    convert([tmp_path / "second.h5ad"], tmp_path / "store", append=True, block_cells=200, bucket_nonzeros=3000)
    store = open_store(tmp_path / "store")
    assert store.n_cells == atlas.n_obs
    np.testing.assert_array_equal(open_modality(store).read([(0, store.n_cells)]),
                                  proteins_of(atlas, store.read_obs().index))


def test_inputs_with_other_panels_or_bad_values_are_refused(atlas, tmp_path):
    reordered = atlas.copy()
    reordered.uns[f"{PROTEIN_KEY}_names"] = reordered.uns[f"{PROTEIN_KEY}_names"][::-1]
    reordered.obs_names = [f"other_{i}" for i in range(reordered.n_obs)]
    reordered.write_h5ad(tmp_path / "reordered.h5ad")
    atlas.write_h5ad(tmp_path / "atlas.h5ad")
    with pytest.raises(SscellError, match="columns differ from .*first difference"):
        convert([tmp_path / "atlas.h5ad", tmp_path / "reordered.h5ad"], tmp_path / "store")
    negative = atlas.copy()
    negative.obsm[PROTEIN_KEY][5, 2] = -1
    negative.write_h5ad(tmp_path / "negative.h5ad")
    with pytest.raises(SscellError, match="negative, NaN or infinite values in rows"):
        convert([tmp_path / "negative.h5ad"], tmp_path / "store2")
    unnamed = atlas.copy()
    del unnamed.uns[f"{PROTEIN_KEY}_names"]
    unnamed.write_h5ad(tmp_path / "unnamed.h5ad")
    with pytest.raises(SscellError, match="has no names; add uns\\['protein_counts_names'\\]"):
        convert([tmp_path / "unnamed.h5ad"], tmp_path / "store3")
    assert not any(p.name.startswith("store") for p in tmp_path.iterdir())


def test_loader_batches_carry_their_rows_proteins_and_resume_identically(atlas, tiny_protein_store, tiny_store):
    store = tiny_protein_store
    ids = store.read_obs().index
    loader = CellLoader(store, "train", 64, seed=3, shards=2, modality=PROTEIN_KEY)
    batches = list(loader.iterate(0, 2 * loader.steps_per_epoch + 1))  # crosses two epoch reshuffles
    for batch in batches:
        assert batch[BATCH_FIELD].shape == (64, 8) and batch[BATCH_FIELD].dtype == np.float32
        np.testing.assert_array_equal(batch[BATCH_FIELD], proteins_of(atlas, ids[batch["cell"]]))
    resumed = CellLoader(store, "train", 64, seed=3, shards=2, modality=PROTEIN_KEY)  # a restarted run
    for step, batch in enumerate(resumed.iterate(5, 8), start=5):
        for name in batches[step]:
            np.testing.assert_array_equal(batch[name], batches[step][name])
    # Without a modality the batches are as before; a store without one refuses it in one line.
    assert BATCH_FIELD not in CellLoader(store, "train", 64, seed=3).batch(0)
    assert not has_modality(tiny_store)
    with pytest.raises(SscellError, match="has no obsm\\['protein_counts'\\].*convert"):
        CellLoader(tiny_store, "train", 64, seed=3, modality=PROTEIN_KEY)


def test_a_cite_seq_file_with_one_matrix_is_split_into_rna_and_proteins(atlas, tmp_path):
    """As the NeurIPS 2021 file: GEX and ADT columns of one counts layer, batch and DonorID in obs."""
    proteins = atlas.obsm[PROTEIN_KEY]
    names = list(atlas.uns[f"{PROTEIN_KEY}_names"])
    combined = anndata.AnnData(
        X=sp.hstack([atlas.X, sp.csr_matrix(proteins)]).tocsr() / 2,  # X normalised, raw counts in the layer
        obs=pd.DataFrame({"cell_type": atlas.obs["cell_type"], "batch": atlas.obs["dataset_id"].astype(str) + "x",
                          "DonorID": atlas.obs["donor_id"].cat.codes}, index=atlas.obs_names),
        var=pd.DataFrame({"feature_types": ["GEX"] * atlas.n_vars + ["ADT"] * len(names),
                          "gene_id": [*atlas.var_names, *names]}, index=[*atlas.var["feature_name"], *names]))
    combined.layers["counts"] = sp.hstack([atlas.X, sp.csr_matrix(proteins)]).tocsr()
    combined.write_h5ad(tmp_path / "cite.h5ad")
    report = split_feature_types(tmp_path / "cite.h5ad", tmp_path / "split.h5ad", n_hvg=40)
    split = anndata.read_h5ad(tmp_path / "split.h5ad")
    assert (report["genes"], report["proteins"]) == (40, 8) and split.shape == (atlas.n_obs, 40)
    assert set(split.var_names) <= set(atlas.var_names)  # Ensembl ids from var['gene_id']
    assert (split.X != atlas[:, split.var_names].X).nnz == 0  # raw counts of the kept genes
    np.testing.assert_array_equal(split.obsm[PROTEIN_KEY], proteins)
    assert list(split.uns[f"{PROTEIN_KEY}_names"]) == names
    assert (split.obs["dataset_id"] == combined.obs["batch"]).all()
    assert (tmp_path / "split.genes.txt").read_text().split() == list(split.var_names)
    convert([tmp_path / "split.h5ad"], tmp_path / "store")
    assert open_modality(open_store(tmp_path / "store")).names == tuple(names)
