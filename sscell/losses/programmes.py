"""Gene-programme tasks: mask whole programmes, or show one programme and predict its TF / itself.

Programmes are the rows of the membership matrix `info.programmes` (programmes x genes), read
from `config.loss.gmt` (see sscell.data.task_data); inside the jit-compiled step it is a constant.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sscell.losses.masking import mask_input, reconstruct_hidden, rescales_inputs
from sscell.losses.registry import register


def choose_programmes(key: jax.Array, n_cells: int, n_programmes: int, rate: float, per_cell: bool = True
                      ) -> jax.Array:
    """Bool (cells, programmes): round(rate * n_programmes) programmes (at least one) chosen uniformly
    without replacement, for each cell independently or (per_cell=False) once for the whole batch."""
    k = max(1, round(rate * n_programmes))
    scores = jax.random.uniform(key, (n_cells if per_cell else 1, n_programmes))
    ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
    return jnp.broadcast_to(ranks < k, (n_cells, n_programmes))


def cover(chosen: jax.Array, membership) -> jax.Array:
    """Bool (cells, genes): the genes of any chosen programme."""
    return (chosen.astype(jnp.float32) @ jnp.asarray(membership, jnp.float32)) > 0


@register("gp_masked", programmes="sets")
def programme_masking(params, batch, key, *, model, config, train=True, extra=None, info=None):
    """Hide the genes of a fraction `mask_rate` of the programmes (per cell unless
    `per_cell_masks` is False); with `rescale_inputs` the survivors are scaled by 1 / (1 - the
    cell's `hidden_share`), as random masking scales by 1 / (1 - mask_rate); reconstruction loss
    on the hidden, measured genes."""
    x = jnp.where(batch["measured"], batch["x"], 0.0)
    mask_key, dropout_key = jax.random.split(key)
    chosen = choose_programmes(mask_key, x.shape[0], len(info.programmes), config.mask_rate,
                               config.get("per_cell_masks", True))
    hidden = cover(chosen, info.programmes)
    inputs = mask_input(x, hidden, hidden_share(hidden, batch["measured"]), rescales_inputs(config))
    return reconstruct_hidden(params, batch, inputs, hidden, dropout_key, model=model, config=config, train=train)


def hidden_share(hidden: jax.Array, measured: jax.Array) -> jax.Array:
    """(cells, 1): the share of each cell's measured genes that `hidden` hides (programmes differ
    in size, so unlike random masking's rate it varies from cell to cell)."""
    n_hidden = jnp.sum(hidden & measured, axis=1, keepdims=True, dtype=jnp.float32)
    return n_hidden / jnp.maximum(jnp.sum(measured, axis=1, keepdims=True, dtype=jnp.float32), 1.0)


def one_programme_views(key: jax.Array, batch: dict, info) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(inputs, shown, programme): each cell sees only the measured genes of one random programme."""
    programme = jax.random.randint(key, (batch["x"].shape[0],), 0, len(info.programmes))
    shown = jnp.asarray(info.programmes)[programme] & batch["measured"]
    return jnp.where(shown, batch["x"], 0.0), shown, programme


@register("gp_to_tf", programmes="tf")
def programme_to_tf(params, batch, key, *, model, config, train=True, extra=None, info=None):
    """Show each cell one TF's target programme only; loss on that TF's expression only.

    `info.programme_genes` holds each programme's TF (never part of its own input).
    """
    view_key, dropout_key = jax.random.split(key)
    inputs, _, programme = one_programme_views(view_key, batch, info)
    tf = jnp.asarray(info.programme_genes)[programme]
    target = jax.nn.one_hot(tf, batch["x"].shape[1], dtype=bool)
    return reconstruct_hidden(params, batch, inputs, target, dropout_key, model=model, config=config, train=train)


@register("gp_to_gp", programmes="sets")
def programme_to_programme(params, batch, key, *, model, config, train=True, extra=None, info=None):
    """Show each cell one programme only; reconstruct that programme."""
    view_key, dropout_key = jax.random.split(key)
    inputs, shown, _ = one_programme_views(view_key, batch, info)
    return reconstruct_hidden(params, batch, inputs, shown, dropout_key, model=model, config=config, train=train)
