"""Converter inputs: gene vocabulary, measured-gene masks, and every kind of bad input."""
from __future__ import annotations

import contextlib

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import zarr
from test_store import dense, input_rows, leftovers, make_adata

import sscell.data.inputs
from sscell.data.convert import convert
from sscell.data.inputs import open_input
from sscell.data.store import open_store
from sscell.errors import SscellError


def on_genes(adata: ad.AnnData, genes: pd.Index) -> np.ndarray:
    """adata's counts as a dense cells x `genes` matrix, zeros for genes it lacks (the reference)."""
    out = np.zeros((adata.n_obs, len(genes)))
    have = genes.get_indexer(adata.var_names)
    out[:, have[have >= 0]] = dense(adata.X)[:, have >= 0]
    return out


def test_vocabulary_file_aligns_genes_and_records_measured(tmp_path):
    lung = make_adata(n_cells=150, n_genes=30, seed=0, prefix="l")                 # ENSG00000-29
    blood = make_adata(n_cells=120, n_genes=40, seed=1, prefix="b")[:, 10:].copy()  # ENSG00010-39
    lung.write_h5ad(tmp_path / "lung.h5ad")
    blood.write_h5ad(tmp_path / "blood.h5ad")
    rng = np.random.default_rng(0)
    # a shuffled vocabulary: genes 5-34 of the inputs plus two nobody measured
    vocabulary = pd.Index(rng.permutation([f"ENSG{j:05d}" for j in range(5, 35)] + ["ENSG90000", "ENSG90001"]))
    (tmp_path / "genes.txt").write_text("\n".join(vocabulary) + "\n")

    report = convert([tmp_path / "lung.h5ad", tmp_path / "blood.h5ad"], tmp_path / "store",
                     vocabulary=tmp_path / "genes.txt", block_cells=32)
    store = open_store(tmp_path / "store")

    assert store.var.index.equals(vocabulary)
    both = ad.concat([lung, blood], join="outer", fill_value=0)
    got = dense(store.read_rows(0, store.n_cells))
    np.testing.assert_array_equal(got, on_genes(both, vocabulary)[input_rows(store, both)])
    assert report["genes_dropped"] == {str(tmp_path / "lung.h5ad"): 5, str(tmp_path / "blood.h5ad"): 5}
    assert store.datasets == ["blood", "lung"] == list(store.read_obs()["dataset_id"].astype("category").cat.categories)
    assert store.measured.dtype == bool and store.measured.shape == (2, len(vocabulary))
    np.testing.assert_array_equal(store.measured[0], vocabulary.isin(blood.var_names))
    np.testing.assert_array_equal(store.measured[1], vocabulary.isin(lung.var_names))
    assert report["gene_coverage"] == {"blood": round(25 / 32, 4), "lung": round(25 / 32, 4)}
    via_anndata = ad.read_zarr(tmp_path / "store")
    np.testing.assert_array_equal(via_anndata.varm["measured"][store.datasets].to_numpy().T, store.measured)


def test_union_vocabulary_and_shared_dataset(tmp_path):
    first = make_adata(n_cells=100, n_genes=20, seed=0, prefix="a")
    second = make_adata(n_cells=80, n_genes=30, seed=1, prefix="b")[:, ::-1][:, :25].copy()  # genes 29..5
    third = make_adata(n_cells=60, n_genes=12, seed=2, prefix="c")
    second.obs["dataset_id"] = "shared"
    third.obs["dataset_id"] = "shared"
    for name, adata in [("first", first), ("second", second), ("third", third)]:
        adata.write_h5ad(tmp_path / f"{name}.h5ad")

    report = convert([tmp_path / f"{n}.h5ad" for n in ("first", "second", "third")], tmp_path / "store")
    store = open_store(tmp_path / "store")

    expected_genes = pd.Index([f"ENSG{j:05d}" for j in list(range(20)) + list(range(29, 19, -1))])
    assert store.var.index.equals(expected_genes)
    assert store.var["feature_name"].tolist() == [f"GENE{j}" for j in list(range(20)) + list(range(29, 19, -1))]
    everything = ad.concat([first, second, third], join="outer", fill_value=0)
    np.testing.assert_array_equal(dense(store.read_rows(0, store.n_cells)),
                                  on_genes(everything, expected_genes)[input_rows(store, everything)])
    assert store.datasets == ["first", "shared"]
    np.testing.assert_array_equal(store.measured[0], expected_genes.isin(first.var_names))
    # a dataset split over two files measured only the genes both files have
    in_both = second.var_names.intersection(third.var_names)
    np.testing.assert_array_equal(store.measured[1], expected_genes.isin(in_both))
    assert report["genes_dropped"] == {str(tmp_path / f"{n}.h5ad"): 0 for n in ("first", "second", "third")}


def test_append_grows_a_derived_vocabulary(tmp_path):
    old = make_adata(n_cells=200, n_genes=30, seed=0, prefix="old-")                   # ENSG00000-29
    new = make_adata(n_cells=150, n_genes=40, seed=1, prefix="new-")[:, 10:].copy()   # ENSG00010-39
    old.write_h5ad(tmp_path / "old.h5ad")
    new.write_h5ad(tmp_path / "new.h5ad")
    convert([tmp_path / "old.h5ad"], tmp_path / "store", seed=1)
    before = open_store(tmp_path / "store")
    before_rows = dense(before.read_rows(0, before.n_cells))[np.argsort(input_rows(before, old))]  # old's order

    report = convert([tmp_path / "new.h5ad"], tmp_path / "store", append=True, seed=2, block_cells=32,
                     bucket_nonzeros=400)
    after = open_store(tmp_path / "store")

    genes = pd.Index([f"ENSG{j:05d}" for j in range(40)])  # new genes come last: stored indices stay valid
    assert after.var.index.equals(genes) and report["genes_added"] == 10
    assert report["genes_dropped"] == {str(tmp_path / "new.h5ad"): 0}
    assert after.var["feature_name"].tolist() == [f"GENE{j}" for j in range(40)]
    everything = ad.concat([old, new], join="outer", fill_value=0)
    got = dense(after.read_rows(0, after.n_cells))
    np.testing.assert_array_equal(got, on_genes(everything, genes)[input_rows(after, everything)])
    old_cells = np.sort(everything.obs_names.get_indexer(old.obs_names))
    np.testing.assert_array_equal(got[np.argsort(input_rows(after, everything))][old_cells, :30], before_rows)
    assert after.datasets == ["new", "old"]
    np.testing.assert_array_equal(after.measured[0], genes.isin(new.var_names))
    np.testing.assert_array_equal(after.measured[1], genes.isin(old.var_names))  # unmeasured: the added genes
    np.testing.assert_array_equal(ad.read_zarr(tmp_path / "store").X.toarray(), got)
    assert leftovers(tmp_path, [tmp_path / n for n in ("old.h5ad", "new.h5ad", "store")]) == []


def test_plain_string_obs_columns_read_in_blocks(tmp_path, monkeypatch):
    adata = make_adata(n_cells=90, n_genes=12, seed=5)
    adata.write_h5ad(tmp_path / "in.h5ad")
    with h5py.File(tmp_path / "in.h5ad", "r+") as f:  # as older writers leave them: strings, not categoricals
        del f["obs/donor_id"]
        f["obs"].create_dataset("donor_id", data=adata.obs["donor_id"].to_numpy(str).astype(object),
                                dtype=h5py.string_dtype())
        f["obs/donor_id"].attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})
    assert not isinstance(ad.read_h5ad(tmp_path / "in.h5ad").obs["donor_id"].dtype, pd.CategoricalDtype)
    monkeypatch.setattr(sscell.data.inputs, "_COLUMN_BLOCK", 7)
    convert([tmp_path / "in.h5ad"], tmp_path / "store")
    store = open_store(tmp_path / "store")
    obs = store.read_obs()
    assert list(obs["donor_id"].astype(str)) == list(adata.obs["donor_id"].iloc[input_rows(store, adata)])
    assert list(obs["donor_id"].cat.categories) == sorted(set(adata.obs["donor_id"]))


def test_gene_column_and_mixed_id_types(tmp_path):
    adata = make_adata(n_cells=80)
    symbols = adata.copy()
    symbols.var = pd.DataFrame({"gene_id": adata.var_names}, index=adata.var["feature_name"].to_numpy())
    symbols.write_h5ad(tmp_path / "symbols.h5ad")
    adata.write_h5ad(tmp_path / "ensembl.h5ad")
    (tmp_path / "genes.txt").write_text("\n".join(adata.var_names))

    with pytest.raises(SscellError, match=r"symbols\.h5ad: gene ids look like symbols .*'GENE0'.* uses Ensembl "
                                          r"ids .*--gene-column=gene_id"):
        convert([tmp_path / "symbols.h5ad"], tmp_path / "store", vocabulary=tmp_path / "genes.txt")
    with pytest.raises(SscellError, match=r"symbols\.h5ad: gene ids look like symbols.*first input's genes"):
        convert([tmp_path / "ensembl.h5ad", tmp_path / "symbols.h5ad"], tmp_path / "store")
    assert leftovers(tmp_path, [tmp_path / n for n in ("symbols.h5ad", "ensembl.h5ad", "genes.txt")]) == []

    convert([tmp_path / "symbols.h5ad"], tmp_path / "store", vocabulary=tmp_path / "genes.txt", gene_column="gene_id")
    store = open_store(tmp_path / "store")
    assert store.var.index.equals(adata.var_names)
    np.testing.assert_array_equal(dense(store.read_rows(0, 80)), dense(adata.X[input_rows(store, adata)]))


def test_round_counts_accepts_non_integer_counts(tmp_path, capsys):
    adata = make_adata(n_cells=60)
    adata.X.data[:50] += 0.4
    adata.X.data[50:60] = 0.3  # rounds to zero: dropped from the sparse rows
    adata.write_h5ad(tmp_path / "soup.h5ad")
    make_adata(n_cells=40, seed=1, prefix="whole").write_h5ad(tmp_path / "whole.h5ad")
    with pytest.raises(SscellError, match="non-integer values.*--round-counts"):
        convert([tmp_path / "soup.h5ad"], tmp_path / "store")
    report = convert([tmp_path / "soup.h5ad", tmp_path / "whole.h5ad"], tmp_path / "store", round_counts=True,
                     block_cells=16)
    store = open_store(tmp_path / "store")
    soup = store.read_obs()["dataset_id"].to_numpy() == "soup"
    rows = adata.obs_names.get_indexer(store.read_obs().index[soup])
    expected = np.rint(dense(adata.X))[rows]
    got = store.read_rows(0, store.n_cells)[np.flatnonzero(soup)]
    np.testing.assert_array_equal(dense(got), expected)
    assert got.nnz == np.count_nonzero(expected)

    share = 60 / adata.X.nnz  # non-integer stored values of soup.h5ad
    shares = {str(tmp_path / "soup.h5ad"): share, str(tmp_path / "whole.h5ad"): 0.0}
    assert report["rounded_counts"] == shares
    assert zarr.open_group(tmp_path / "store", mode="r").attrs["sscell"]["rounded_counts"] == shares
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and "soup.h5ad" in warnings[0] and f"{share:.2%}" in warnings[0]

    make_adata(n_cells=30, seed=2, prefix="more").write_h5ad(tmp_path / "more.h5ad")
    convert([tmp_path / "more.h5ad"], tmp_path / "store", append=True)  # the record stays
    assert zarr.open_group(tmp_path / "store", mode="r").attrs["sscell"]["rounded_counts"] == shares


def test_open_input_without_required_obs(tmp_path):
    adata = make_adata(n_cells=30)
    del adata.obs["cell_type"], adata.obs["donor_id"]
    adata.write_h5ad(tmp_path / "bare.h5ad")
    with contextlib.ExitStack() as stack:
        with pytest.raises(SscellError, match=r"bare\.h5ad: obs lacks required column\(s\) cell_type, donor_id"):
            open_input(tmp_path / "bare.h5ad", stack)
        inp = open_input(tmp_path / "bare.h5ad", stack, required_obs=())
        assert sorted(inp.obs.columns) == ["assay", "dataset_id"]  # what is there is read
        assert list(inp.obs["assay"]) == list(adata.obs["assay"])
        assert list(inp.read_ids(0, 30)) == [c.encode() for c in adata.obs_names]


def write_bad(tmp_path, problem: str):
    """Write bad.h5ad with `problem`; return extra convert() arguments."""
    path = tmp_path / "bad.h5ad"
    adata = make_adata(n_cells=100)
    if problem == "empty":
        adata[:0].copy().write_h5ad(path)
    elif problem in ("truncated", "corrupt"):
        adata.write_h5ad(path)
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2] if problem == "truncated" else raw[:4096] + b"\x17" * (len(raw) - 4096))
    elif problem == "duplicated gene":
        adata.var_names = ["ENSG00001"] + list(adata.var_names[1:])
        adata.write_h5ad(path)
    elif problem == "missing cell_type":
        del adata.obs["cell_type"]
        adata.write_h5ad(path)
    elif problem == "infinite":
        adata.X.data[3] = np.inf
        adata.write_h5ad(path)
    elif problem == "no overlap":
        adata.write_h5ad(path)
        (tmp_path / "genes.txt").write_text("ENSG99990\nENSG99991\n")
        return {"vocabulary": tmp_path / "genes.txt"}
    return {}


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
@pytest.mark.parametrize("problem, message", [
    ("empty", "holds no cells"),
    ("truncated", "truncated or corrupt"),
    ("corrupt", "truncated or corrupt"),
    ("duplicated gene", "gene id 'ENSG00001' appears more than once"),
    ("missing cell_type", "obs lacks required column.*cell_type"),
    ("infinite", "NaN or infinite"),
    ("no overlap", "none of its 40 genes .* is in the vocabulary"),
])
def test_bad_input_one_line_naming_the_file(tmp_path, problem, message):
    extra = write_bad(tmp_path, problem)
    before = list(tmp_path.iterdir())
    with pytest.raises(SscellError, match=rf"bad\.h5ad.*{message}") as error:
        convert([tmp_path / "bad.h5ad"], tmp_path / "store", block_cells=16, **extra)
    assert "\n" not in str(error.value)
    assert leftovers(tmp_path, before) == []


def test_split_column_overrides_the_donor_split(tmp_path):
    adata = make_adata(n_cells=200, n_genes=20, seed=3, prefix="s")
    given = np.random.default_rng(1).choice(["train", "val", "test"], adata.n_obs)  # cuts across donors
    adata.obs["my_split"] = pd.Categorical(given)
    adata.write_h5ad(tmp_path / "in.h5ad")
    convert([tmp_path / "in.h5ad"], tmp_path / "store", split_column="my_split", block_cells=64)
    store = open_store(tmp_path / "store")
    expected = pd.Series(given, index=adata.obs_names.astype(str))
    np.testing.assert_array_equal(store.read_obs()["split"].astype(str), expected[store.read_obs().index].to_numpy())
    for split in ("train", "val", "test"):  # still grouped: each split one contiguous range
        start, stop = store.split_range(split)
        assert (store.read_obs()["split"].iloc[start:stop] == split).all()


def test_split_column_with_bad_values(tmp_path):
    adata = make_adata(n_cells=50, n_genes=10, seed=4, prefix="t")
    adata.obs["my_split"] = pd.Categorical(["train"] * 25 + ["holdout"] * 25)
    adata.write_h5ad(tmp_path / "in.h5ad")
    with pytest.raises(SscellError, match="in.h5ad: obs column 'my_split' holds holdout"):
        convert([tmp_path / "in.h5ad"], tmp_path / "store", split_column="my_split")
    with pytest.raises(SscellError, match="no split column 'nope'"):
        convert([tmp_path / "in.h5ad"], tmp_path / "store", split_column="nope")
    assert leftovers(tmp_path, [tmp_path / "in.h5ad"]) == []
