"""The jit-compiled train and validation steps: densify, normalise, loss, optimiser update."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sscell.data.preprocess import densify, log1p_normalise
from sscell.data.task_data import TaskInfo
from sscell.losses.registry import Task

NONZERO_FIELDS = ("genes", "counts", "indptr")  # a loader batch's sparse counts (layout: sscell.data.loader)


def task_batch(batch: dict, n_genes: int, measured_table: np.ndarray) -> dict:
    """The loss's view of a loader batch (inside jit): "counts" (dense, unmeasured genes 0),
    "library", "x" (log1p counts per 10k), "measured" (`measured_table[batch["dataset"]]`),
    "nonzeros" (the loader's (genes, counts, indptr), unmeasured genes included) and the integer
    labels. Unmeasured genes are zeroed before the library is summed, so their values can never
    reach a loss. What a loss does not use, XLA never computes."""
    measured = jnp.asarray(measured_table)[batch["dataset"]]
    nonzeros = tuple(batch[k] for k in NONZERO_FIELDS)
    counts = jnp.where(measured, densify(*nonzeros, n_genes), 0.0)
    labels = {k: v for k, v in batch.items() if k not in NONZERO_FIELDS}
    return {**labels, "counts": counts, "library": counts.sum(-1, keepdims=True),
            "x": log1p_normalise(counts), "measured": measured, "nonzeros": nonzeros}


def _bound_loss(task: Task, model: nn.Module, config: ml_collections.ConfigDict, info: TaskInfo, train: bool):
    return functools.partial(task.loss, model=model, config=config.loss, info=info, train=train)


def _after_update(new_extra, state: dict, params):
    """`new_extra` if the optimiser changed the parameters this call, else the old extra: a
    micro-batch of gradient accumulation, or a skipped non-finite step, must not move e.g.
    BYOL's EMA target."""
    if not jax.tree.leaves(state["extra"]):
        return new_extra
    changed = jnp.any(jnp.stack([jnp.any(new != old) for new, old in
                                 zip(jax.tree.leaves(params), jax.tree.leaves(state["params"]))]))
    return jax.tree.map(lambda new, old: jnp.where(changed, new, old), new_extra, state["extra"])


def make_train_step(task: Task, model: nn.Module, config: ml_collections.ConfigDict,
                    optimizer: optax.GradientTransformation, info: TaskInfo, state_sharding, batch_sharding):
    """`step(state, batch, key) -> (state, metrics)`; the state's buffers are donated.

    `state_sharding` / `batch_sharding` are shardings (or pytrees of them) of the state and
    batch. The step's randomness is `fold_in(key, state["step"])`, so a resumed run draws the
    same masks and dropout as an uninterrupted one. After the update the task's
    `update_extra` advances `state["extra"]` (e.g. BYOL's EMA target).
    """
    loss = _bound_loss(task, model, config, info, train=True)
    measured = info.measured_table()

    def step(state, batch, key):
        step_key = jax.random.fold_in(key, state["step"])
        grad_fn = jax.value_and_grad(loss, has_aux=True)
        (_, metrics), grads = grad_fn(state["params"], task_batch(batch, info.n_genes, measured), step_key,
                                      extra=state["extra"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_step = state["step"] + 1
        extra = _after_update(task.update_extra(state["extra"], params, new_step, config), state, params)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
        return {"params": params, "opt_state": opt_state, "step": new_step, "extra": extra}, metrics

    return jax.jit(step, in_shardings=(state_sharding, batch_sharding, None),
                   out_shardings=(state_sharding, None), donate_argnums=(0,))


def make_eval_step(task: Task, model: nn.Module, config: ml_collections.ConfigDict, info: TaskInfo):
    """`eval_step(state, batch, key) -> metrics` with dropout off (validation loss)."""
    loss = _bound_loss(task, model, config, info, train=False)
    measured = info.measured_table()

    @jax.jit
    def eval_step(state, batch, key):
        return loss(state["params"], task_batch(batch, info.n_genes, measured), key, extra=state["extra"])[1]

    return eval_step
