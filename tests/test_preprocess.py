"""Flat sharded nonzeros -> dense -> log1p-normalised, against numpy formulas."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import scipy.sparse as sp

from sscell.data.loader import nnz_bucket, shard_nonzeros
from sscell.data.preprocess import densify, log1p_normalise
from sscell.training.step import task_batch


def random_counts(cells=60, genes=40, density=0.2, seed=0):
    rng = np.random.default_rng(seed)
    dense = rng.poisson(3.0, (cells, genes)) * (rng.random((cells, genes)) < density)
    dense[0] = dense[-1] = 0  # empty cells, first and last of their shards
    dense[7] = rng.integers(1, 9, genes)  # a full cell
    return sp.csr_matrix(dense.astype(np.uint16))


def flat(counts, shards=1, size=None):
    return shard_nonzeros(counts.data, counts.indices, np.diff(counts.indptr), shards, size)


def reference_dense(batch, n_genes):
    """numpy: shard s's cell i holds genes/counts[s, indptr[s, i]:indptr[s, i + 1]]."""
    shards, cells = batch["indptr"].shape[0], batch["indptr"].shape[1] - 1
    dense = np.zeros((shards * cells, n_genes))
    for s in range(shards):
        for i in range(cells):
            lo, hi = batch["indptr"][s, i], batch["indptr"][s, i + 1]
            np.add.at(dense[s * cells + i], batch["genes"][s, lo:hi].astype(int), batch["counts"][s, lo:hi])
    return dense


def test_nnz_bucket_pads_under_an_eighth_with_eight_sizes_per_doubling():
    n = np.arange(1, 70_000)
    buckets = np.array([nnz_bucket(int(k)) for k in n])
    assert (buckets >= n).all() and (buckets[n > 16] < n[n > 16] * 1.125).all() and (buckets[n <= 16] == 16).all()
    assert (np.diff(buckets) >= 0).all()
    for k in range(5, 16):
        assert len(np.unique(buckets[(n > 2**k) & (n <= 2**(k + 1))])) == 8


@pytest.mark.parametrize("shards", [1, 3, 6])
def test_shard_nonzeros_layout(shards):
    counts = random_counts()
    batch = flat(counts, shards)
    cells = counts.shape[0] // shards
    assert batch["genes"].shape == batch["counts"].shape and batch["indptr"].shape == (shards, cells + 1)
    assert batch["genes"].dtype == counts.indices.dtype and batch["counts"].dtype == np.uint16
    per_shard = np.add.reduceat(np.diff(counts.indptr), np.arange(0, counts.shape[0], cells))
    np.testing.assert_array_equal(batch["indptr"][:, -1], per_shard)
    assert batch["genes"].shape[1] == nnz_bucket(per_shard.max())
    for s in range(shards):  # padding past each shard's nonzeros is zeros
        assert not batch["counts"][s, per_shard[s]:].any() and not batch["genes"][s, per_shard[s]:].any()
    np.testing.assert_array_equal(reference_dense(batch, counts.shape[1]), counts.toarray())


@pytest.mark.parametrize("shards", [1, 4])
def test_densify_matches_csr_and_ignores_padding(shards):
    counts = random_counts()
    batch = flat(counts, shards, size=2 * nnz_bucket(counts.nnz))  # generous padding
    for s in range(shards):  # padding filled with junk: densify must drop it by position, not by value
        end = batch["indptr"][s, -1]
        batch["genes"][s, end:] = np.arange(batch["genes"].shape[1] - end) % counts.shape[1]
        batch["counts"][s, end:] = 7
    got = jax.jit(densify, static_argnums=3)(batch["genes"], batch["counts"], batch["indptr"], counts.shape[1])
    np.testing.assert_array_equal(np.asarray(got), counts.toarray())


def test_log1p_normalise_matches_numpy_formula():
    dense = random_counts().toarray().astype(np.float32)
    library = dense.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.where(library > 0, np.log1p(dense / library * 1e4), 0.0)
    got = np.asarray(jax.jit(log1p_normalise)(dense))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.all(got[0] == 0) and np.isfinite(got).all()


def test_expression_of_a_loader_batch():
    counts = random_counts(seed=3)
    dense = counts.toarray().astype(np.float64)
    library = np.maximum(dense.sum(1, keepdims=True), 1)
    measured = np.ones((2, counts.shape[1]), bool)
    measured[1, ::3] = False  # dataset 1 did not measure every third gene
    dataset = np.arange(len(dense), dtype=np.int32) % 2
    batch = {**flat(counts, shards=2), "dataset": dataset}
    got = jax.jit(lambda b: task_batch(b, counts.shape[1], measured))(batch)
    dense = np.where(measured[dataset], dense, 0)
    library = np.maximum(dense.sum(1, keepdims=True), 1)
    np.testing.assert_allclose(np.asarray(got["counts"]), dense)
    np.testing.assert_allclose(np.asarray(got["x"]), np.log1p(dense / library * 1e4), rtol=1e-5, atol=1e-6)
    assert set(got) == {"dataset", "counts", "library", "x", "measured", "nonzeros"}
    for got_field, field in zip(got["nonzeros"], ("genes", "counts", "indptr")):
        np.testing.assert_array_equal(np.asarray(got_field), batch[field])


SHARDED_DENSIFY = """
import json, jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from sscell.data.preprocess import densify
rng = np.random.default_rng(0)
genes = rng.integers(0, 50, (4, 64)).astype(np.uint16)
counts = rng.integers(1, 5, (4, 64)).astype(np.uint16)
indptr = np.sort(rng.integers(0, 60, (4, 9)), axis=1).astype(np.int32)
indptr[:, 0] = 0
mesh = jax.make_mesh((4,), ("data",))
sharded = NamedSharding(mesh, PartitionSpec("data"))
f = jax.jit(densify, static_argnums=3, in_shardings=(sharded,) * 3, out_shardings=sharded)
compiled = f.lower(genes, counts, indptr, 50).compile()
out = f(genes, counts, indptr, 50)
print(json.dumps({"hlo": compiled.as_text(), "dense": np.asarray(out).tolist(),
                  "single": np.asarray(jax.jit(densify, static_argnums=3)(genes, counts, indptr, 50)).tolist(),
                  "devices": [len(s.data) for s in out.addressable_shards]}))
"""


def test_densify_on_four_devices_moves_no_data():
    """Each device densifies its own shard: the compiled program has no collective and the
    result equals the one-device result."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    run = subprocess.run([sys.executable, "-c", SHARDED_DENSIFY], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    for collective in ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter"):
        assert collective not in result["hlo"]
    assert result["devices"] == [8, 8, 8, 8]
    np.testing.assert_array_equal(result["dense"], result["single"])
