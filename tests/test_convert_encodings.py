"""Converter inputs written with every obs / var encoding anndata has (0.13 writes pandas strings
as nullable-string-array groups), read in row blocks."""
from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from test_store import dense, input_rows, make_adata

import sscell.data.inputs
from sscell.data.convert import convert
from sscell.data.h5columns import Column
from sscell.data.store import open_store


def as_strings(values, strings: str):
    """`values` as pandas "string" values or a numpy object array of str (None stays missing)."""
    values = np.asarray([None if v is None else str(v) for v in values], dtype=object)
    return pd.array(values, dtype="string") if strings == "string" else values


def with_encodings(adata: ad.AnnData, strings: str) -> ad.AnnData:
    """`adata` with its obs / var strings as `strings` ("string": pandas string dtype, else
    objects), an optional column with missing values and columns of integers and booleans."""
    adata = adata.copy()
    n = adata.n_obs
    adata.obs_names = pd.Index(as_strings(adata.obs_names, strings))
    adata.var_names = pd.Index(as_strings(adata.var_names, strings))
    adata.var["feature_name"] = as_strings(adata.var["feature_name"], strings)
    for column in ("cell_type", "donor_id", "assay"):
        adata.obs[column] = as_strings(adata.obs[column], strings)
    tissue = as_strings(np.where(np.arange(n) % 3 == 0, None, "lung"), strings)  # some missing
    adata.obs["tissue"] = tissue if strings == "string" else pd.Categorical(tissue)  # objects: no missing values
    adata.obs["dataset_id"] = pd.array(np.arange(n) % 2, dtype="Int64")        # nullable-integer
    adata.obs["flag"] = pd.array(np.arange(n) % 4 == 0, dtype="boolean")       # nullable-boolean
    return adata


@pytest.mark.parametrize("strings, categoricals", [("string", False), ("string", True), ("object", False)])
def test_every_encoding_converts(tmp_path, monkeypatch, strings, categoricals):
    adata = with_encodings(make_adata(n_cells=90, n_genes=12, seed=7), strings)
    adata.raw = adata  # counts from raw.X, genes from raw/var
    with ad.settings.override(allow_write_nullable_strings=True):
        adata.write_h5ad(tmp_path / "in.h5ad", convert_strings_to_categoricals=categoricals)
    with h5py.File(tmp_path / "in.h5ad", "r") as f:
        encodings = {k: f["obs"][k].attrs["encoding-type"] for k in f["obs"]}
    if strings == "string":  # the layouts anndata 0.13 writes: the index a group of values + mask
        assert encodings["_index"] == "nullable-string-array"
        assert encodings["cell_type"] == ("categorical" if categoricals else "nullable-string-array")
    assert encodings["dataset_id"] == "nullable-integer"
    monkeypatch.setattr(sscell.data.inputs, "_COLUMN_BLOCK", 7)  # columns read in many blocks

    report = convert([tmp_path / "in.h5ad"], tmp_path / "store", block_cells=16)  # ids too
    store = open_store(tmp_path / "store")

    assert report["counts_source"] == {str(tmp_path / "in.h5ad"): "raw.X"}
    rows = input_rows(store, adata)
    np.testing.assert_array_equal(dense(store.read_rows(0, store.n_cells)), dense(adata.X[rows]))
    obs = store.read_obs()
    for column in ("cell_type", "donor_id", "assay", "dataset_id"):
        assert list(obs[column].astype(str)) == list(adata.obs[column].astype(str).iloc[rows])
    expected_tissue = adata.obs["tissue"].iloc[rows].to_numpy(object)
    assert list(obs["tissue"].isna()) == list(pd.isna(expected_tissue))
    assert (obs["tissue"].dropna() == "lung").all()
    assert store.var.index.equals(pd.Index(adata.var_names.to_numpy(object)))
    assert list(store.var["feature_name"].astype(str)) == list(adata.var["feature_name"].astype(str))


@pytest.mark.parametrize("strings", ["string", "object"])
def test_blocks_match_anndata_whole_reads(tmp_path, strings):
    adata = with_encodings(make_adata(n_cells=50, n_genes=5, seed=8), strings)
    adata.obs["codes"] = pd.Categorical(np.where(np.arange(50) % 5 == 0, None, adata.obs["assay"].to_numpy(object)))
    with ad.settings.override(allow_write_nullable_strings=True):
        adata.write_h5ad(tmp_path / "in.h5ad", convert_strings_to_categoricals=False)
    with h5py.File(tmp_path / "in.h5ad", "r") as f:
        for name in f["obs"]:
            column = Column(f["obs"][name])
            whole = np.asarray(ad.io.read_elem(f["obs"][name]), dtype=object)  # the reference
            blocks = np.concatenate([column.block(a, min(a + 7, 50)) for a in range(0, 50, 7)])
            assert len(column) == 50 and len(blocks) == 50
            assert list(pd.isna(blocks)) == list(pd.isna(whole)), name
            assert [str(v) for v in blocks[~pd.isna(whole)]] == [str(v) for v in whole[~pd.isna(whole)]], name
            categorical = column.categorical(block_rows=6)
            assert list(categorical.isna()) == list(pd.isna(whole)), name
            assert list(categorical.dropna()) == [str(v) for v in whole[~pd.isna(whole)]], name
