"""The optimiser: AdamW after global-norm clipping, a learning-rate schedule, and options for
gradient accumulation and skipping non-finite steps (all optax)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sscell.errors import SscellError


def make_schedule(train_config, steps_per_epoch: int) -> optax.Schedule:
    """The learning rate per optimiser update (not per micro-batch when accumulating).

    "step_decay" (the study's): lr x `lr_decay` every `lr_decay_steps` steps if > 0, else every
    `lr_decay_epochs` epochs (which on a small dataset are few steps).
    "warmup_cosine": linear warm-up over `warmup_steps` to lr, cosine decay to 0 at `steps`.
    """
    if train_config.schedule == "step_decay":
        decay_steps = train_config.get("lr_decay_steps", 0)
        decay_updates = (decay_steps / train_config.grad_accum if decay_steps > 0
                         else train_config.lr_decay_epochs * (steps_per_epoch / train_config.grad_accum))
        return optax.exponential_decay(
            init_value=train_config.lr,
            transition_steps=max(1, int(decay_updates)),
            decay_rate=train_config.lr_decay,
            staircase=True,
        )
    if train_config.schedule == "warmup_cosine":
        total = max(1, train_config.steps // train_config.grad_accum)
        return optax.warmup_cosine_decay_schedule(0.0, train_config.lr, min(train_config.warmup_steps, total - 1),
                                                  total)
    raise SscellError(f"unknown train.schedule '{train_config.schedule}'; choose step_decay or warmup_cosine")


def learning_rate(schedule: optax.Schedule, train_config, step: int) -> float:
    """The learning rate of training step `step` (1-based): the schedule at the optimiser
    updates made before it (non-finite steps skipped under `skip_nonfinite` aside)."""
    return float(schedule((step - 1) // train_config.grad_accum))


def schedule_warning(train_config, steps_per_epoch: int) -> str | None:
    """A one-line warning if the schedule brings the learning rate below 10% of its peak
    within the first third of `train.steps` (the later steps then barely learn), else None."""
    if train_config.schedule != "step_decay":
        return None
    third = max(1, train_config.steps // 3)
    lr = learning_rate(make_schedule(train_config, steps_per_epoch), train_config, third)
    if lr >= 0.1 * train_config.lr:
        return None
    return (f"warning: the learning rate falls to {lr / train_config.lr:.1%} of train.lr by step {third} "
            f"(a third of train.steps={train_config.steps}); decay more slowly, e.g. "
            f"--config.train.lr_decay_steps={max(1, train_config.steps // 8)}")


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """`optax.clip_by_global_norm` (same state, same result up to rounding) that scales by a
    multiplication: XLA copies a multiply into each consumer (AdamW's two moment updates) but
    writes out a divided copy of every gradient first, ~15% of the study model's CPU step."""

    def update(updates, state, params=None):
        norm = optax.tree.norm(updates)
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def matrices_only(params) -> dict:
    """True for weight matrices, False for biases and normalisation scales (1-D parameters)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def _base_optimizer(train_config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """`train.optimizer`: "adamw" (the study's) or "lars" (optax.lars, the study's Barlow Twins).

    `lr_reference_batch` > 0 scales the schedule by the cells per update (batch_size x
    grad_accum) / lr_reference_batch (Barlow Twins: lr per 256 cells). LARS follows the
    published Barlow Twins / BYOL recipe: with `lars_exclude_bias_and_norm` (default) biases and
    normalisation parameters get neither weight decay nor the trust ratio; pair it with the
    "warmup_cosine" schedule.
    """
    name = train_config.get("optimizer", "adamw")
    reference = train_config.get("lr_reference_batch", 0)
    scale = train_config.batch_size * train_config.grad_accum / reference if reference else 1.0  # cells per update

    def learning_rate(step):
        return schedule(step) * scale

    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=train_config.weight_decay)
    if name == "lars":
        mask = matrices_only if train_config.get("lars_exclude_bias_and_norm", True) else True
        return optax.lars(learning_rate, weight_decay=train_config.weight_decay, momentum=0.9,
                          weight_decay_mask=mask, trust_ratio_mask=mask)
    raise SscellError(f"unknown train.optimizer '{name}'; choose adamw or lars")


def make_optimizer(train_config, steps_per_epoch: int) -> optax.GradientTransformation:
    """AdamW(schedule, weight decay) after clipping at `grad_clip`.

    `grad_accum` > 1 averages the gradients of that many micro-batches per update
    (optax.MultiSteps). `skip_nonfinite` = N > 0 leaves the state unchanged on a step whose
    gradients are not finite (optax.apply_if_finite); the training loop stops at the (N+1)th in a row.
    """
    if train_config.grad_accum < 1:
        raise SscellError(f"train.grad_accum is {train_config.grad_accum}; use 1 (no accumulation) or more")
    optimizer = optax.chain(
        clip_by_global_norm(train_config.grad_clip),
        _base_optimizer(train_config, make_schedule(train_config, steps_per_epoch)),
    )
    if train_config.grad_accum > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=train_config.grad_accum).gradient_transformation()
    if train_config.skip_nonfinite:
        optimizer = optax.apply_if_finite(optimizer, max_consecutive_errors=train_config.skip_nonfinite)
    return optimizer
