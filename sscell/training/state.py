"""The train state: a plain pytree {"params", "opt_state", "step"}, created already sharded."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from sscell.models.mlp import init_params


def _init(model: nn.Module, optimizer: optax.GradientTransformation, key: jax.Array) -> dict:
    params = init_params(model, key)
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}


def create_state(model: nn.Module, optimizer: optax.GradientTransformation, key: jax.Array,
                 sharding: NamedSharding) -> dict:
    """A fresh train state, placed with `sharding` as it is created."""
    return jax.jit(functools.partial(_init, model, optimizer), out_shardings=sharding)(key)


def abstract_state(model: nn.Module, optimizer: optax.GradientTransformation,
                   sharding: NamedSharding) -> dict:
    """Shapes, dtypes and shardings of the train state, for restoring a checkpoint into."""
    shapes = jax.eval_shape(functools.partial(_init, model, optimizer), jax.random.key(0))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
