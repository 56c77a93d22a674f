"""On-device preprocessing: padded sparse rows -> dense counts -> log1p(counts per 10k).

These run inside the jit-compiled step, so the host only ships the nonzeros.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def densify(genes: jax.Array, counts: jax.Array, n_genes: int) -> jax.Array:
    """Dense (cells, n_genes) float32 counts from padded rows.

    `genes` and `counts` are (cells, width): each row holds one cell's nonzeros, padded with
    count 0 (the padded gene index is irrelevant because adding 0 changes nothing).
    """
    cells = genes.shape[0]
    rows = jnp.arange(cells)[:, None]
    dense = jnp.zeros((cells, n_genes), jnp.float32)
    return dense.at[rows, genes].add(counts.astype(jnp.float32), mode="drop")


def log1p_normalise(counts: jax.Array, target_sum: float = 1e4) -> jax.Array:
    """log1p of counts scaled to `target_sum` per cell (the study's preprocessing).

    Cells without counts (padding rows) stay all-zero instead of dividing by zero.
    """
    library = counts.sum(axis=-1, keepdims=True)
    scale = jnp.where(library > 0, target_sum / jnp.maximum(library, 1e-12), 0.0)
    return jnp.log1p(counts * scale)

