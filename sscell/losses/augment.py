"""Augmentations that make the two views of a cell for the contrastive tasks.

Each is applied to a cell with its own probability (`config.aug_*_prob`), in this order:
negative-binomial resampling of the counts, dropout masking of genes, additive Gaussian noise
on the log1p values clamped at 0. Unmeasured genes stay 0 in every view.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sscell.data.preprocess import log1p_normalise


def nb_resample(key: jax.Array, counts: jax.Array, theta: float) -> jax.Array:
    """Counts drawn from NB(mean = counts, inverse dispersion theta), as a gamma-Poisson mixture."""
    gamma_key, poisson_key = jax.random.split(key)
    rate = jax.random.gamma(gamma_key, theta, counts.shape) / theta * counts
    return jax.random.poisson(poisson_key, rate).astype(jnp.float32)


def augment(key: jax.Array, batch: dict, config) -> jax.Array:
    """One augmented view (log1p space, cells x genes) of `batch`."""
    keys = jax.random.split(key, 7)
    n_cells = batch["x"].shape[0]

    def chosen(k, prob):  # which cells get an augmentation, as a (cells, 1) column
        return jax.random.bernoulli(k, prob, (n_cells, 1))

    resampled = log1p_normalise(nb_resample(keys[0], batch["counts"] * batch["measured"], config.aug_nb_theta))
    x = jnp.where(chosen(keys[1], config.aug_nb_prob), resampled, batch["x"])
    dropped = jax.random.bernoulli(keys[2], config.aug_dropout_rate, x.shape)
    x = jnp.where(chosen(keys[3], config.aug_dropout_prob) & dropped, 0.0, x)
    noisy = jnp.maximum(x + config.aug_gauss_std * jax.random.normal(keys[4], x.shape), 0.0)
    x = jnp.where(chosen(keys[5], config.aug_gauss_prob), noisy, x)
    return jnp.where(batch["measured"], x, 0.0)


def two_views(key: jax.Array, batch: dict, config) -> tuple[jax.Array, jax.Array]:
    """Two independently augmented views of every cell, drawn in one `augment` call on the batch
    stacked twice (the samplers' loops are compiled once, not twice)."""
    fields = ("x", "counts", "measured")
    stacked = {k: jnp.concatenate([batch[k], batch[k]]) for k in fields}
    views = augment(key, stacked, config)
    return views[: batch["x"].shape[0]], views[batch["x"].shape[0]:]
