"""An example pretext task, the one docs/extending.md walks through: denoising.

Gaussian noise is added to every measured gene; the autoencoder reconstructs the clean values.
Importing this module registers it; experiments/example_task.py does so and selects it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sscell.losses.registry import register


@register("denoise")
def denoising(params, batch, key, *, model, config, train=True, extra=None, info=None):
    """Mean squared error between the reconstruction of a noisy cell and the clean cell."""
    noise_key, dropout_key = jax.random.split(key)
    measured = batch["measured"]
    noisy = jnp.where(measured, batch["x"] + config.noise_std * jax.random.normal(noise_key, batch["x"].shape), 0.0)
    reconstruction, _ = model.apply({"params": params}, noisy, train=train, rngs={"dropout": dropout_key})
    squared_error = jnp.where(measured, jnp.square(reconstruction - batch["x"]), 0.0)
    loss = squared_error.sum() / jnp.maximum(measured.sum(), 1)
    return loss, {"loss": loss}
