"""Tests for the synthetic atlas: CELLxGENE shape, count statistics, structure, determinism, I/O."""
from __future__ import annotations

import dataclasses
import itertools
import re

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scipy.stats
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import NearestCentroid

from sscell.data import synthetic
from sscell.data.synthetic import CELL_TYPES, AtlasSpec, generate_atlas, main, write_atlas
from sscell.errors import SscellError

SMALL = AtlasSpec(n_cells=2_000, n_genes=200)
LEAVES = {t.name for t in CELL_TYPES} - {t.parent for t in CELL_TYPES}
PARENT = {t.name: t.parent for t in CELL_TYPES}
# NearestCentroid warns when a gene is all-zero within a class, which sparse counts make common.
quiet_centroids = pytest.mark.filterwarnings("ignore:self.within_class_std_dev_")


@pytest.fixture(scope="module")
def small() -> anndata.AnnData:
    return generate_atlas(SMALL)


def _log1p_normalised(x: sp.csr_matrix) -> np.ndarray:
    """The usual scanpy preprocessing: counts per 10,000 then log1p."""
    dense = x.toarray()
    return np.log1p(dense / dense.sum(axis=1, keepdims=True) * 1e4)


def _lineage(name: str) -> list[str]:
    """The type and its ancestors, from the table alone."""
    chain = []
    while name is not None:
        assert len(chain) < len(PARENT), f"the parent table has a cycle through {name}"
        chain.append(name)
        name = PARENT[name]
    return chain


@pytest.mark.parametrize(
    "spec",
    [SMALL, AtlasSpec(n_cells=2_000, n_genes=200, genes_per_programme=4), AtlasSpec(n_cells=400)],
    ids=["200 genes", "200 genes sparse programmes", "2000 genes"],
)
def test_counts_are_sparse_non_negative_integers(spec):
    x = generate_atlas(spec).X
    assert sp.issparse(x) and x.format == "csr"
    assert x.dtype == np.float32 and x.shape == (spec.n_cells, spec.n_genes)
    assert np.all(x.data > 0) and np.array_equal(x.data, np.round(x.data))
    assert 0.85 <= 1 - x.nnz / (spec.n_cells * spec.n_genes) <= 0.95
    assert np.all(np.diff(x.indptr) > 0), "some cell has no counts"


def test_library_sizes_vary_and_differ_between_datasets(small):
    library = np.asarray(small.X.sum(axis=1)).ravel()
    assert 0.4 <= library.std() / library.mean() <= 0.9
    dataset = small.obs["dataset_id"].to_numpy()
    per_dataset = [library[dataset == d] for d in np.unique(dataset)]
    assert scipy.stats.kruskal(*per_dataset).pvalue < 1e-6


def test_library_size_scales_with_gene_count():
    def mean_library(n_genes: int) -> float:
        return float(generate_atlas(AtlasSpec(n_cells=400, n_genes=n_genes)).X.sum()) / 400

    assert 5 < mean_library(2_000) / mean_library(200) < 20


def test_obs_and_var_look_like_cellxgene(small):
    obs, var = small.obs, small.var
    categorical = ("cell_type", "cell_type_ontology_term_id", "donor_id", "dataset_id", "assay")
    for column in (*categorical, "tissue"):
        assert isinstance(obs[column].dtype, pd.CategoricalDtype), column
    assert obs.index.is_unique and all(re.fullmatch(r"cell_\d{6}", i) for i in obs.index)
    assert var.index.is_unique and all(re.fullmatch(r"ENSG\d{11}", g) for g in var.index)
    assert var["feature_name"].is_unique
    assert set(obs["dataset_id"]) == {f"dataset_{k}" for k in range(SMALL.n_datasets)}
    # Donors belong to exactly one dataset; assay and tissue are properties of a dataset.
    per_donor = obs.groupby("donor_id", observed=True)["dataset_id"].nunique()
    assert len(per_donor) == SMALL.n_datasets * SMALL.donors_per_dataset and (per_donor == 1).all()
    per_dataset = obs.groupby("dataset_id", observed=True)[["assay", "tissue"]].nunique()
    assert (per_dataset.to_numpy() == 1).all()


def test_ontology_table_is_a_tree_of_real_looking_terms(small):
    names = [t.name for t in CELL_TYPES]
    ids = [t.ontology_id for t in CELL_TYPES]
    assert len(set(names)) == len(names) and len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"CL:\d{7}", i) for i in ids)
    assert all(t.parent is None or t.parent in names for t in CELL_TYPES)
    depths = [len(_lineage(n)) for n in names]  # also checks there is no cycle
    assert max(depths) in (2, 3)
    term = {t.name: t.ontology_id for t in CELL_TYPES}
    pairs = small.obs[["cell_type", "cell_type_ontology_term_id"]].drop_duplicates()
    assert all(term[n] == i for n, i in pairs.itertuples(index=False))


def test_every_leaf_type_in_every_dataset(small):
    table = pd.crosstab(small.obs["dataset_id"], small.obs["cell_type"])
    assert set(table.columns) == LEAVES and (table.to_numpy() > 0).all()
    assert table.to_numpy().sum() == SMALL.n_cells
    shares = table.sum(axis=0) / SMALL.n_cells
    assert shares.min() >= 0.01 and shares.max() / shares.min() > 2  # unequal, none vanishing


def test_smallest_valid_atlas_still_covers_every_type():
    spec = AtlasSpec(n_cells=4 * len(LEAVES), n_genes=50, n_programmes=14, genes_per_programme=5)
    obs = generate_atlas(spec).obs
    assert (pd.crosstab(obs["dataset_id"], obs["cell_type"]).to_numpy() == 1).all()


@quiet_centroids
def test_cell_types_are_separable_and_hierarchical(small):
    y = _log1p_normalised(small.X)
    labels = small.obs["cell_type"].to_numpy()
    accuracy = cross_val_score(NearestCentroid(), y, labels, cv=2).mean()
    assert accuracy > 0.85  # chance is ~0.1, the commonest type ~0.2
    # Siblings under a deep parent (CD4/CD8, classical/non-classical) sit closer than
    # leaves from unrelated lineages, since they share all but their own programmes.
    centroid = {c: y[labels == c].mean(axis=0) for c in LEAVES}
    by_shared = {0: [], 1: [], 2: []}
    for a, b in itertools.combinations(sorted(LEAVES), 2):
        shared = len(set(_lineage(a)) & set(_lineage(b)))
        by_shared[shared].append(np.linalg.norm(centroid[a] - centroid[b]))
    assert max(by_shared[2]) < min(by_shared[0])
    assert np.mean(by_shared[2]) < np.mean(by_shared[1]) < np.mean(by_shared[0])


@quiet_centroids
def test_batch_effect_makes_datasets_distinguishable():
    def dataset_accuracy(batch_effect: float) -> float:
        atlas = generate_atlas(AtlasSpec(n_cells=1_500, n_genes=1_000, batch_effect=batch_effect))
        common = atlas.obs["cell_type"] == atlas.obs["cell_type"].value_counts().index[0]
        y = _log1p_normalised(atlas.X[common.to_numpy()])
        datasets = atlas.obs["dataset_id"][common].to_numpy()
        return cross_val_score(NearestCentroid(), y, datasets, cv=3).mean()

    with_batch, without = dataset_accuracy(0.3), dataset_accuracy(0.0)
    assert with_batch > 0.6 and without < 0.45 and with_batch > without + 0.25  # chance ~0.25


def test_gene_programmes_name_real_genes(small):
    programmes = small.uns["gene_programmes"]
    assert len(programmes) == SMALL.n_programmes
    for genes in programmes.values():
        assert len(set(genes)) == SMALL.genes_per_programme
        assert set(genes) <= set(small.var_names)


def _assert_same(a: anndata.AnnData, b: anndata.AnnData) -> None:
    assert a.X.shape == b.X.shape and a.X.dtype == b.X.dtype and (a.X != b.X).nnz == 0
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)


def test_same_spec_gives_the_same_atlas_across_chunks(monkeypatch):
    monkeypatch.setattr(synthetic, "CHUNK_ENTRIES", 60 * 128)  # chunks of 128 cells
    spec = AtlasSpec(n_cells=1_000, n_genes=60, n_programmes=14, genes_per_programme=5)
    first, second = generate_atlas(spec), generate_atlas(spec)
    _assert_same(first, second)
    assert first.uns["gene_programmes"] == second.uns["gene_programmes"]
    other = generate_atlas(dataclasses.replace(spec, seed=1))
    assert (first.X != other.X).nnz > 0
    assert not first.obs["cell_type"].equals(other.obs["cell_type"])


def test_write_atlas_round_trips_atomically(tmp_path):
    path = tmp_path / "atlas.h5ad"
    path.write_text("an older file to replace")
    written = write_atlas(SMALL, path)
    _assert_same(written, anndata.read_h5ad(path))
    _assert_same(written, generate_atlas(SMALL))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atlas.h5ad"]  # no temp file left


def test_write_atlas_needs_an_existing_folder(tmp_path):
    with pytest.raises(SscellError, match="does not exist"):
        write_atlas(SMALL, tmp_path / "missing" / "atlas.h5ad")


def test_command_line_writes_the_atlas(tmp_path, capsys):
    path = tmp_path / "cli.h5ad"
    main([f"--output={path}", "--cells=300", "--genes=100", "--seed=3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "300 cells x 100 genes" in lines[0]
    expected = generate_atlas(AtlasSpec(n_cells=300, n_genes=100, seed=3))
    _assert_same(anndata.read_h5ad(path), expected)


@pytest.mark.parametrize(
    "bad",
    [
        {"n_programmes": 5},
        {"genes_per_programme": 300},
        {"n_cells": 10},
        {"n_datasets": 0},
        {"batch_effect": -1.0},
    ],
)
def test_bad_specs_raise_a_clear_error(bad):
    with pytest.raises(SscellError):
        generate_atlas(AtlasSpec(**{"n_cells": 2_000, "n_genes": 200, **bad}))
