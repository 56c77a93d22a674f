"""Random gene masking (the study's best pretext task): hide genes, reconstruct them."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sscell.losses.registry import register


def random_gene_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """Boolean mask, True where a gene is hidden; each (cell, gene) independently with `rate`."""
    return jax.random.bernoulli(key, rate, shape)


def mask_input(x: jax.Array, mask: jax.Array, rate: float) -> jax.Array:
    """Hidden entries become 0, survivors are scaled by 1 / (1 - rate) (inverted dropout)."""
    return jnp.where(mask, 0.0, x / (1.0 - rate))


@register("masked")
def masked_reconstruction(params, batch, key, *, model, config, train=True):
    """Mean squared error of the reconstruction on the masked entries only."""
    x = batch["x"]
    mask_key, dropout_key = jax.random.split(key)
    mask = random_gene_mask(mask_key, x.shape, config.mask_rate)
    reconstruction, _ = model.apply({"params": params}, mask_input(x, mask, config.mask_rate),
                                    train=train, rngs={"dropout": dropout_key})
    squared_error = jnp.square(reconstruction - x)
    loss = jnp.sum(squared_error * mask) / jnp.maximum(jnp.sum(mask), 1)
    return loss, {"loss": loss, "mse_all": jnp.mean(squared_error), "mask_fraction": jnp.mean(mask)}
