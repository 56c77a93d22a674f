"""Padded sparse rows -> dense -> log1p-normalised, against numpy formulas."""
import jax
import numpy as np
import scipy.sparse as sp

from sscell.data.loader import padded_rows
from sscell.data.preprocess import densify, log1p_normalise
from sscell.training.step import task_batch


def random_counts(cells=50, genes=40, density=0.2, seed=0):
    rng = np.random.default_rng(seed)
    dense = rng.poisson(3.0, (cells, genes)) * (rng.random((cells, genes)) < density)
    dense[0] = 0  # an empty cell
    return sp.csr_matrix(dense.astype(np.float32))


def test_padded_rows_round_trip_and_power_of_two_width():
    counts = random_counts()
    genes, values = padded_rows(counts)
    width = genes.shape[1]
    assert width & (width - 1) == 0 and width >= np.diff(counts.indptr).max()
    dense = np.zeros(counts.shape, np.float32)
    np.add.at(dense, (np.arange(counts.shape[0])[:, None].repeat(width, 1), genes), values)
    np.testing.assert_array_equal(dense, counts.toarray())


def test_densify_matches_csr():
    counts = random_counts()
    genes, values = padded_rows(counts)
    np.testing.assert_array_equal(np.asarray(densify(genes, values, counts.shape[1])), counts.toarray())


def test_log1p_normalise_matches_numpy_formula():
    dense = random_counts().toarray()
    library = dense.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.where(library > 0, np.log1p(dense / library * 1e4), 0.0)
    got = np.asarray(jax.jit(log1p_normalise)(dense))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.all(got[0] == 0) and np.isfinite(got).all()


def test_expression_of_a_loader_batch():
    counts = random_counts(seed=3)
    genes, values = padded_rows(counts)
    dense = counts.toarray()
    library = np.maximum(dense.sum(1, keepdims=True), 1)
    batch = {"genes": genes, "counts": values, "dataset": np.zeros(len(dense), np.int32)}
    got = np.asarray(task_batch(batch, counts.shape[1], np.ones((1, counts.shape[1]), bool))["x"])
    np.testing.assert_allclose(got, np.log1p(dense / library * 1e4), rtol=1e-5, atol=1e-6)
