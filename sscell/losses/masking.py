"""Random gene masking (the study's best pretext task): hide genes, reconstruct them."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from sscell.losses.reconstruction import reconstruction_loss
from sscell.losses.registry import register
from sscell.models.hash_random import bernoulli


def random_gene_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """Boolean mask, True where a gene is hidden; each (cell, gene) independently with `rate`."""
    return bernoulli(key, rate, shape)


def mask_input(x: jax.Array, mask: jax.Array, rate: float | jax.Array, rescale: bool = True) -> jax.Array:
    """Hidden entries become 0; with `rescale` (`loss.rescale_inputs`, the authors' choice) the
    survivors are scaled by 1 / (1 - rate), inverted dropout, `rate` being the share hidden (a
    number, or per cell (cells, 1)), so the input's expected sum stays that of the whole cell."""
    if not rescale:
        return jnp.where(mask, 0.0, x)
    return jnp.where(mask, 0.0, x / jnp.maximum(1.0 - rate, 1e-6))


def rescales_inputs(loss_config: ml_collections.ConfigDict) -> bool:
    """`loss.rescale_inputs`: whether a masking task scales the visible genes (`mask_input`);
    True also for a run saved before the setting existed."""
    return loss_config.get("rescale_inputs", True)


def reconstruct_hidden(params, batch, inputs, hidden, dropout_key, *, model, config, train):
    """Shared by the masking tasks: encode `inputs`, score the reconstruction on `hidden` genes.

    Validation (`train=False`) adds the diagnostics "mse_all" and "mask_fraction"; train steps
    skip them (each is a pass over the cells x genes batch)."""
    output, _ = model.apply({"params": params}, inputs, train=train, rngs={"dropout": dropout_key})
    loss, metrics = reconstruction_loss(output, params, batch, hidden, config.get("likelihood", "mse"),
                                        diagnostics=not train)
    if not train:
        metrics["mask_fraction"] = jnp.mean(hidden, dtype=jnp.float32)
    return loss, {"loss": loss, **metrics}


@register("masked")
def masked_reconstruction(params, batch, key, *, model, config, train=True, extra=None, info=None):
    """Reconstruction loss on the masked (and measured) entries only; unmeasured genes enter as 0."""
    x = jnp.where(batch["measured"], batch["x"], 0.0)
    mask_key, dropout_key = jax.random.split(key)
    mask = random_gene_mask(mask_key, x.shape, config.mask_rate)
    inputs = mask_input(x, mask, config.mask_rate, rescales_inputs(config))
    return reconstruct_hidden(params, batch, inputs, mask, dropout_key,
                              model=model, config=config, train=train)
