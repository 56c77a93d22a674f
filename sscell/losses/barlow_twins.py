"""Barlow Twins: the cross-correlation of two views' projections is pushed to the identity."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sscell.losses.augment import two_views
from sscell.losses.registry import register
from sscell.models.siamese import build_siamese, standardise


def cross_correlation_loss(z1: jax.Array, z2: jax.Array, lambd: float) -> tuple[jax.Array, jax.Array]:
    """(loss, cross-correlation): C = standardised(z1)^T standardised(z2) / cells,
    loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2."""
    c = standardise(z1).T @ standardise(z2) / z1.shape[0]
    on_diagonal = jnp.sum(jnp.square(1.0 - jnp.diag(c)))
    off_diagonal = jnp.sum(jnp.square(c)) - jnp.sum(jnp.square(jnp.diag(c)))
    return on_diagonal + lambd * off_diagonal, c


@register("barlow_twins", build_model=build_siamese)
def barlow_twins_loss(params, batch, key, *, model, config, train=True, extra=None, info=None):
    """Barlow Twins loss (lambda = `config.lambd`) of two augmented views of each cell."""
    keys = jax.random.split(key, 3)
    v1, v2 = two_views(keys[0], batch, config)
    z1 = model.apply({"params": params}, v1, train=train, rngs={"dropout": keys[1]})[0]
    z2 = model.apply({"params": params}, v2, train=train, rngs={"dropout": keys[2]})[0]
    loss, c = cross_correlation_loss(z1, z2, config.lambd)
    return loss, {"loss": loss, "mean_diagonal": jnp.mean(jnp.diag(c))}
