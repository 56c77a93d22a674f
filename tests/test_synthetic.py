"""Tests for the synthetic atlas: CELLxGENE shape, count statistics, structure, TFs, target, I/O."""
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
from sklearn.model_selection import cross_val_predict, cross_val_score
from sklearn.neighbors import NearestCentroid

from sscell.data import synthetic
from sscell.data.gmt import read_gmt
from sscell.data.synthetic import (
    CELL_TYPES,
    AtlasSpec,
    generate_atlas,
    generate_target,
    main,
    programmes_path,
    target_path,
    tf_targets_path,
    write_atlas,
)
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
    def mean_library(n_genes: int) -> float:  # over seeds: one draw of baselines varies a lot
        return np.mean([generate_atlas(AtlasSpec(n_cells=200, n_genes=n_genes, seed=s)).X.sum() / 200
                        for s in range(3)])

    assert 3 < mean_library(2_000) / mean_library(200) < 20


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


def _lists(sets) -> dict[str, list[str]]:
    """Gene sets with plain lists (read_h5ad gives arrays)."""
    return {name: list(genes) for name, genes in sets.items()}


def test_streamed_atlas_equals_the_in_memory_one(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "CHUNK_ENTRIES", 200 * 128)  # 16 chunks of 128 cells...
    monkeypatch.setattr(synthetic, "H5_CHUNK", 1000)  # ...spread over many HDF5 chunks
    path = tmp_path / "atlas.h5ad"
    path.write_text("an older file to replace")
    (tmp_path / "atlas.target.h5ad").write_text("a stale target: this spec has none")
    summary = write_atlas(SMALL, path)
    read, expected = anndata.read_h5ad(path), generate_atlas(SMALL)
    _assert_same(read, expected)
    assert _lists(read.uns["gene_programmes"]) == expected.uns["gene_programmes"]
    assert _lists(read.uns["tf_targets"]) == expected.uns["tf_targets"]
    assert summary["nonzeros"] == expected.X.nnz and summary["cells"] == SMALL.n_cells
    assert summary["target"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [  # no temp file, no stale target
        "atlas.h5ad", "atlas.programmes.gmt", "atlas.tf_targets.gmt"]


def test_gmt_files_round_trip_and_match_the_atlas(tmp_path):
    path = tmp_path / "atlas.h5ad"
    write_atlas(SMALL, path)
    adata = anndata.read_h5ad(path)
    programmes, tf_targets = read_gmt(programmes_path(path)), read_gmt(tf_targets_path(path))
    assert programmes == _lists(adata.uns["gene_programmes"]) and len(programmes) == SMALL.n_programmes
    assert tf_targets == _lists(adata.uns["tf_targets"])
    # One distinct TF per programme, flagged in var, driving exactly that programme's genes.
    assert list(tf_targets.values()) == list(programmes.values())
    assert set(tf_targets) == set(adata.var_names[adata.var["is_tf"]])
    assert len(tf_targets) == SMALL.n_programmes
    assert all(tf not in targets for tf, targets in tf_targets.items())


def _partial_spearman(a: np.ndarray, b: np.ndarray, control: np.ndarray) -> float:
    """Spearman correlation of a and b with the (linear, rank) effect of `control` removed."""
    ranks = [scipy.stats.rankdata(v) for v in (a, b, control)]
    design = np.c_[np.ones_like(ranks[2]), ranks[2]]
    a_res, b_res = (r - design @ np.linalg.lstsq(design, r, rcond=None)[0] for r in ranks[:2])
    return float(np.corrcoef(a_res, b_res)[0, 1])


def test_tf_expression_follows_its_targets_activity():
    atlas = generate_atlas(AtlasSpec(n_cells=2_000, n_genes=1_000, genes_per_programme=20))
    counts = atlas.X.toarray()
    library = counts.sum(axis=1)
    y = _log1p_normalised(atlas.X)
    column = {g: i for i, g in enumerate(atlas.var_names)}
    in_programmes = {g for genes in atlas.uns["gene_programmes"].values() for g in genes}
    # Controls: genes in no programme, not TFs, expressed about as often as a TF.
    controls = [column[g] for g in atlas.var_names[~atlas.var["is_tf"]]
                if g not in in_programmes and (counts[:, column[g]] > 0).mean() > 0.2]
    rng = np.random.default_rng(0)
    tf_r, control_r = [], []
    for tf, targets in atlas.uns["tf_targets"].items():
        activity = y[:, [column[g] for g in targets]].mean(axis=1)  # the targets' activity per cell
        tf_r.append(_partial_spearman(y[:, column[tf]], activity, library))
        control_r.append(_partial_spearman(y[:, rng.choice(controls)], activity, library))
    tf_r, control_r = np.array(tf_r), np.array(control_r)
    # Sparse counts cap per-cell correlations (~11% nonzero); controls keep ~0.1 through depth.
    assert np.median(tf_r) > 0.2 and np.median(control_r) < 0.15  # measured: 0.27 and 0.11
    assert np.mean(tf_r > control_r) >= 0.9 and np.median(tf_r - control_r) > 0.1


@quiet_centroids
def test_target_dataset_has_its_types_own_ids_and_a_stronger_batch_effect():
    types = ("B cell", "classical monocyte", "CD4-positive, alpha-beta T cell")
    spec = dataclasses.replace(SMALL, n_genes=1_000, target_cells=600, target_cell_types=types)
    atlas, target = generate_atlas(spec), generate_target(spec)
    _assert_same(atlas, generate_atlas(dataclasses.replace(spec, target_cells=0)))  # unchanged
    assert set(target.obs["cell_type"]) == set(types) == set(target.obs["cell_type"].cat.categories)
    assert target.n_obs == 600 and (target.var.equals(atlas.var))
    assert target.uns["tf_targets"] == atlas.uns["tf_targets"]
    for column in ("donor_id", "dataset_id"):
        assert not set(target.obs[column]) & set(atlas.obs[column]), column
    assert not set(target.obs_names) & set(atlas.obs_names)
    assert target.obs["donor_id"].nunique() == spec.donors_per_dataset
    assert set(target.obs["assay"]) == {synthetic.TARGET_ASSAY}
    assert set(target.obs["assay"]).isdisjoint(atlas.obs["assay"])
    # On cells of the shared types, a classifier of datasets finds the target's cells far more
    # reliably than any atlas dataset's (its batch effect is 3x theirs).
    both = anndata.concat([atlas, target])
    shared = both.obs["cell_type"].isin(types).to_numpy()
    datasets = both.obs["dataset_id"].to_numpy()[shared]
    predicted = cross_val_predict(NearestCentroid(), _log1p_normalised(both.X[shared]), datasets, cv=3)
    recall = {d: np.mean(predicted[datasets == d] == d) for d in np.unique(datasets)}
    target_recall = recall.pop("target_dataset_0")
    assert target_recall > 0.9 and target_recall > max(recall.values()) + 0.2, (target_recall, recall)


def test_write_atlas_writes_the_target_too(tmp_path):
    types = ("natural killer cell", "fibroblast")
    spec = dataclasses.replace(SMALL, target_cells=300, target_cell_types=types)
    summary = write_atlas(spec, tmp_path / "atlas.h5ad")
    assert summary["target"] == target_path(tmp_path / "atlas.h5ad") == tmp_path / "atlas.target.h5ad"
    written = anndata.read_h5ad(summary["target"])
    _assert_same(written, generate_target(spec))
    assert summary["target_cells"] == 300 and summary["target_nonzeros"] == written.X.nnz
    _assert_same(anndata.read_h5ad(tmp_path / "atlas.h5ad"), generate_atlas(SMALL))


def test_cell_types_match_the_cell_ontology():
    ontology_parser = pytest.importorskip("cellxgene_ontology_guide.ontology_parser")
    ontology = ontology_parser.OntologyParser()
    term = {t.name: t.ontology_id for t in CELL_TYPES}
    for cell_type in CELL_TYPES:
        assert ontology.get_term_label(cell_type.ontology_id) == cell_type.name
        assert not ontology.is_term_deprecated(cell_type.ontology_id), cell_type.name
        # The parent is the nearest ontology ancestor among the listed types (and only roots
        # have none), so the table is the real hierarchy restricted to its types.
        distance = ontology.get_term_ancestors_with_distances(cell_type.ontology_id)
        listed = {name: distance[i] for name, i in term.items() if i in distance and name != cell_type.name}
        if cell_type.parent is None:
            assert not listed, cell_type.name
        else:
            assert listed and min(listed, key=listed.get) == cell_type.parent, cell_type.name


def test_write_atlas_needs_an_existing_folder(tmp_path):
    with pytest.raises(SscellError, match="does not exist"):
        write_atlas(SMALL, tmp_path / "missing" / "atlas.h5ad")


def test_command_line_writes_the_atlas(tmp_path, capsys):
    path = tmp_path / "cli.h5ad"
    main([f"--output={path}", "--cells=300", "--genes=100", "--seed=3", "--target-cells=100",
          "--target-cell-type=B cell", "--target-cell-type", "CD8-positive, alpha-beta T cell"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and "300 cells x 100 genes" in lines[0] and "cli.tf_targets.gmt" in lines[1]
    assert "100 cells, 2 cell types" in lines[2]
    spec = AtlasSpec(n_cells=300, n_genes=100, seed=3, target_cells=100,
                     target_cell_types=("B cell", "CD8-positive, alpha-beta T cell"))
    _assert_same(anndata.read_h5ad(path), generate_atlas(spec))
    _assert_same(anndata.read_h5ad(tmp_path / "cli.target.h5ad"), generate_target(spec))
    assert read_gmt(tmp_path / "cli.programmes.gmt") == generate_atlas(spec).uns["gene_programmes"]


def test_command_line_rejects_an_unknown_target_type(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([f"--output={tmp_path / 'a.h5ad'}", "--cells=300", "--genes=100", "--target-cells=50",
              "--target-cell-type=T cell"])  # not a leaf
    assert exit_info.value.code == 2 and "target_cell_types" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"n_programmes": 5}, r"n_programmes=5: need at least"),
        ({"genes_per_programme": 300}, r"n_genes=200 is too small for programmes of 300 genes"),
        ({"n_cells": 10}, r"n_cells=10 is too small"),
        ({"n_datasets": 0}, r"n_datasets=0: must be at least 1"),
        ({"batch_effect": -1.0}, r"batch effects must be non-negative"),
        ({"n_genes": 60, "n_programmes": 14, "genes_per_programme": 50},  # no room for the TFs
         r"n_genes=60 is too small for programmes of 50 genes plus 14 transcription factors"),
        ({"target_cells": 5}, r"target_cells=5 is too small"),
        ({"target_cells": 100, "target_cell_types": ("B cell", "B cell")}, r"target_cell_types: duplicated names"),
        ({"target_cells": 100, "target_cell_types": ("plasma cell",)}, r"target_cell_types: \['plasma cell'\]"),
    ],
)
def test_bad_specs_raise_a_clear_error(bad, message):
    with pytest.raises(SscellError, match=message):
        generate_atlas(AtlasSpec(**{"n_cells": 2_000, "n_genes": 200, **bad}))
