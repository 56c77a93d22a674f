"""BYOL: an online network predicts an EMA target network's projection of another view of the cell."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sscell.losses.augment import two_views
from sscell.losses.registry import register
from sscell.models.siamese import build_siamese


def cosine_loss(p: jax.Array, z: jax.Array) -> jax.Array:
    """Mean over cells of 2 - 2 cos(p, z)."""
    p = p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), 1e-12)
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    return jnp.mean(2.0 - 2.0 * jnp.sum(p * z, axis=-1))


def ema_decay(step, loss_config) -> jax.Array:
    """The target's decay at `step`: constant `ema_decay`, or with ema_schedule "cosine" rising
    from `ema_decay` to 1 over `ema_steps` steps (BYOL's schedule)."""
    if loss_config.ema_schedule == "constant":
        return jnp.asarray(loss_config.ema_decay, jnp.float32)
    progress = jnp.minimum(step / max(loss_config.ema_steps, 1), 1.0)
    return 1.0 - (1.0 - loss_config.ema_decay) * (jnp.cos(math.pi * progress) + 1.0) / 2.0


def init_target(params, config) -> dict:
    """The target network starts as a copy of the online network."""
    return {"target": jax.tree.map(jnp.copy, params)}


def update_target(extra, params, step, config) -> dict:
    """target <- tau * target + (1 - tau) * online, after every optimiser update."""
    tau = ema_decay(step, config.loss)
    return {"target": jax.tree.map(lambda t, p: tau * t + (1.0 - tau) * p, extra["target"], params)}


def build_byol_model(config, info):
    """Encoder, projector and predictor (`config.loss.projector`, `config.loss.predictor`)."""
    return build_siamese(config, info, predictor=config.loss.predictor)


@register("byol", build_model=build_byol_model, init_extra=init_target, update_extra=update_target)
def byol_loss(params, batch, key, *, model, config, train=True, extra=None, info=None):
    """Symmetric BYOL loss: online prediction of view 1 vs target projection of view 2, and back.

    The online network runs with dropout when training; the target always runs without it."""
    keys = jax.random.split(key, 6)
    views = two_views(keys[0], batch, config)

    def online(view, k):
        return model.apply({"params": params}, view, train=train, rngs={"dropout": k})[1]

    def target(view):  # deterministic (no dropout): the EMA network gives the online one a stable target
        return jax.lax.stop_gradient(model.apply({"params": extra["target"]}, view, train=False)[0])

    loss = (cosine_loss(online(views[0], keys[2]), target(views[1]))
            + cosine_loss(online(views[1], keys[4]), target(views[0])))
    return loss, {"loss": loss}
