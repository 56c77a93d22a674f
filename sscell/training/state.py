"""The train state: a plain pytree {"params", "opt_state", "step", "extra"}, created already sharded.

`extra` is the pretext task's state outside the gradient (e.g. BYOL's EMA target), from
`init_extra(params)`; most tasks keep it empty.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from sscell.models.mlp import init_params


def no_extra(params) -> dict:
    """The `extra` of tasks without non-gradient state."""
    return {}


def _init(model: nn.Module, optimizer: optax.GradientTransformation, init_extra: Callable, key: jax.Array) -> dict:
    params = init_params(model, key)
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32),
            "extra": init_extra(params)}


def create_state(model: nn.Module, optimizer: optax.GradientTransformation, key: jax.Array,
                 sharding: NamedSharding | dict, init_extra: Callable = no_extra) -> dict:
    """A fresh train state, placed with `sharding` (one, or a pytree like the state) as it is created."""
    return jax.jit(functools.partial(_init, model, optimizer, init_extra), out_shardings=sharding)(key)


def abstract_state(model: nn.Module, optimizer: optax.GradientTransformation,
                   sharding: NamedSharding | dict | None = None, init_extra: Callable = no_extra) -> dict:
    """Shapes, dtypes and shardings of the train state, for restoring a checkpoint into.

    `sharding` is one NamedSharding for every leaf, a pytree of them like the state, or None.
    """
    shapes = jax.eval_shape(functools.partial(_init, model, optimizer, init_extra), jax.random.key(0))
    if sharding is None:
        return shapes
    if isinstance(sharding, NamedSharding):
        sharding = jax.tree.map(lambda _: sharding, shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, sharding)
