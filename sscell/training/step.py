"""The jit-compiled train and validation steps: densify, normalise, loss, AdamW update."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import optax
from jax.sharding import NamedSharding

from sscell.data.preprocess import expression


def _task_batch(batch: dict, n_genes: int) -> dict:
    """The loss's view of a loader batch: expression `x` plus the integer labels."""
    labels = {k: v for k, v in batch.items() if k not in ("genes", "counts")}
    return {"x": expression(batch, n_genes), **labels}


def make_train_step(model: nn.Module, loss_fn, loss_config, optimizer: optax.GradientTransformation,
                    n_genes: int, state_sharding: NamedSharding, batch_sharding: NamedSharding):
    """`step(state, batch, key) -> (state, metrics)`; the state's buffers are donated.

    The step's randomness is `fold_in(key, state["step"])`, so a resumed run draws the same
    masks and dropout as an uninterrupted one.
    """
    loss = functools.partial(loss_fn, model=model, config=loss_config, train=True)

    def step(state, batch, key):
        task_batch = _task_batch(batch, n_genes)
        step_key = jax.random.fold_in(key, state["step"])
        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state["params"], task_batch, step_key)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    return jax.jit(step, in_shardings=(state_sharding, batch_sharding, None),
                   out_shardings=(state_sharding, None), donate_argnums=(0,))


def make_eval_step(model: nn.Module, loss_fn, loss_config, n_genes: int):
    """`eval_step(params, batch, key) -> metrics` with dropout off (validation loss)."""
    loss = functools.partial(loss_fn, model=model, config=loss_config, train=False)

    @jax.jit
    def eval_step(params, batch, key):
        return loss(params, _task_batch(batch, n_genes), key)[1]

    return eval_step
