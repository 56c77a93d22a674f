"""Augmentations that make the two views of a cell for the contrastive tasks.

Each is applied to a cell with its own probability (`config.aug_*_prob`), in this order:
negative-binomial resampling of the counts, dropout masking of genes, additive Gaussian noise
on the log1p values clamped at 0. Unmeasured genes stay 0 in every view.

Cost: a zero count resamples to zero, so the resampling draws only for the batch's nonzeros
(its flat CSR, `batch["nonzeros"]`), ~10x fewer than cells x genes, with a fixed-cost sampler;
every draw comes from a counter hash (`sscell.models.hash_random`) instead of threefry.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sscell.data.preprocess import densify, log1p_normalise, row_ids
from sscell.errors import SscellError
from sscell.models.hash_random import bernoulli, hash_bits, normal, normal_of, open_unit_interval

POISSON_INVERSION_BELOW = 8.0  # rates below: exact inversion; at or above: normal approximation
POISSON_INVERSION_STEPS = 24  # P(X > 24) < 1e-6 for a rate below 8


def nb_resample(key: jax.Array, counts: jax.Array, ids: jax.Array, theta: float) -> jax.Array:
    """Counts drawn from NB(mean = counts, inverse dispersion theta >= 1), as a gamma-Poisson mixture.

    Each entry's draw is a pure function of (key, its uint32 id), so it never depends on which
    other entries the batch holds. Fixed cost per entry, no rejection loops (jax.random's gamma
    and Poisson samplers cost ~1.5 us an entry on a CPU core): the gamma by the Wilson-Hilferty
    cube of a normal, the Poisson by inversion below a rate of 8 and by a normal with continuity
    correction above; the tests hold the mean, variance and distribution to NB's.
    """
    if theta < 1.0:
        raise SscellError(f"loss.aug_nb_theta={theta}: the negative-binomial resampling needs an inverse "
                          "dispersion of at least 1; raise it")
    gamma_key, uniform_key, normal_key = jax.random.split(key, 3)
    z = normal_of(hash_bits(gamma_key, ids))
    gamma = jnp.maximum(1.0 - 1.0 / (9.0 * theta) + z / (3.0 * theta**0.5), 0.0) ** 3  # Gamma(theta) / theta
    rate = gamma * counts

    u = (open_unit_interval(hash_bits(uniform_key, ids)) + 1.0) * 0.5  # uniform on (0, 1)
    small = jnp.minimum(rate, POISSON_INVERSION_BELOW)
    term = jnp.exp(-small)
    cdf, draw = term, jnp.zeros_like(rate)
    for k in range(1, POISSON_INVERSION_STEPS + 1):  # draw = #{k : u > P(X <= k - 1)}
        draw = draw + (u > cdf)
        term = term * small / k
        cdf = cdf + term
    normal_draw = jnp.maximum(jnp.floor(rate + jnp.sqrt(rate) * normal_of(hash_bits(normal_key, ids)) + 0.5), 0.0)
    return jnp.where(rate < POISSON_INVERSION_BELOW, draw, normal_draw)


def entry_ids(genes: jax.Array, indptr: jax.Array, n_genes: int) -> jax.Array:
    """uint32 id of each slot of the flat sharded nonzeros: (its cell over all shards) * n_genes + gene
    (unique for up to 2**32 / n_genes cells: 222,000 at 19,331 genes)."""
    shards, size = genes.shape
    cells = indptr.shape[-1] - 1
    rows = jax.vmap(row_ids, in_axes=(0, None))(indptr, size) + cells * jnp.arange(shards, dtype=jnp.int32)[:, None]
    return rows.astype(jnp.uint32) * jnp.uint32(n_genes) + genes.astype(jnp.uint32)


def augment(key: jax.Array, batch: dict, config) -> jax.Array:
    """One augmented view (log1p space, cells x genes) of `batch` ("x", "measured", "nonzeros")."""
    keys = jax.random.split(key, 6)
    n_cells, n_genes = batch["x"].shape

    def chosen(k, prob):  # which cells get an augmentation, as a (cells, 1) column
        return jax.random.bernoulli(k, prob, (n_cells, 1))

    genes, counts, indptr = batch["nonzeros"]
    draws = nb_resample(keys[0], counts.astype(jnp.float32), entry_ids(genes, indptr, n_genes), config.aug_nb_theta)
    resampled = densify(genes, draws, indptr, n_genes)
    resampled = log1p_normalise(jnp.where(batch["measured"], resampled, 0.0))
    x = jnp.where(chosen(keys[1], config.aug_nb_prob), resampled, batch["x"])
    dropped = bernoulli(keys[2], config.aug_dropout_rate, x.shape)
    x = jnp.where(chosen(keys[3], config.aug_dropout_prob) & dropped, 0.0, x)
    noisy = jnp.maximum(x + config.aug_gauss_std * normal(keys[4], x.shape), 0.0)
    x = jnp.where(chosen(keys[5], config.aug_gauss_prob), noisy, x)
    return jnp.where(batch["measured"], x, 0.0)


def two_views(key: jax.Array, batch: dict, config) -> tuple[jax.Array, jax.Array]:
    """Two independently augmented views of every cell, drawn in one `augment` call on the batch
    stacked twice (the second copy's cells have their own positions and ids, so their own draws)."""
    stacked = jax.tree.map(lambda a: jnp.concatenate([a, a]),
                           {k: batch[k] for k in ("x", "measured", "nonzeros")})
    views = augment(key, stacked, config)
    return views[: batch["x"].shape[0]], views[batch["x"].shape[0]:]
