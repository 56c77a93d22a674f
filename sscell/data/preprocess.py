"""On-device preprocessing: flat sharded nonzeros -> dense counts -> log1p(counts per 10k).

These run inside the jit-compiled step, so the host only ships the nonzeros (layout:
`sscell.data.loader`; a second modality's batch fields are named here).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

BATCH_FIELD = "modality"  # the loader batch field holding the rows' (dense) second-modality values
PEAK_FIELDS = ("peaks", "peak_counts", "peak_indptr")  # a sparse modality's flat fields in a loader batch


def row_ids(indptr: jax.Array, size: int) -> jax.Array:
    """The cell (row) of each of a shard's `size` nonzero slots, from its indptr (cells + 1).

    Slots past `indptr[-1]` (padding) get row `cells`, one past the last, so a scatter with
    mode="drop" ignores them.
    """
    starts = jnp.zeros(size + 1, jnp.int32).at[indptr[1:]].add(1)  # +1 at each cell's end
    return jnp.cumsum(starts[:size])


def densify(genes: jax.Array, counts: jax.Array, indptr: jax.Array, n_genes: int) -> jax.Array:
    """Dense (shards * cells, n_genes) float32 counts from the flat sharded layout.

    `genes` / `counts` are (shards, size) and `indptr` (shards, cells + 1); shard s fills rows
    [s * cells, (s + 1) * cells). Each shard scatters into its own rows (a vmap over shards), so
    when the leading axis is split over devices, each device densifies its own cells and no
    data moves between devices.
    """
    cells = indptr.shape[-1] - 1

    def shard(genes: jax.Array, counts: jax.Array, indptr: jax.Array) -> jax.Array:
        # One flat index per nonzero (padding lands past the end and is dropped): a 1-D scatter
        # builds a third of the index data that a (row, gene) scatter does.
        flat = row_ids(indptr, genes.shape[-1]) * n_genes + genes.astype(jnp.int32)
        dense = jnp.zeros(cells * n_genes, jnp.float32)
        return dense.at[flat].add(counts.astype(jnp.float32), mode="drop")

    return jax.vmap(shard)(genes, counts, indptr).reshape(-1, n_genes)


def log1p_normalise(counts: jax.Array, target_sum: float = 1e4) -> jax.Array:
    """log1p of counts scaled to `target_sum` per cell (the study's preprocessing).

    Cells without counts (padding rows) stay all-zero instead of dividing by zero.
    """
    library = counts.sum(axis=-1, keepdims=True)
    scale = jnp.where(library > 0, target_sum / jnp.maximum(library, 1e-12), 0.0)
    return jnp.log1p(counts * scale)
