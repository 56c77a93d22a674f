"""The study's optimiser: AdamW with global-norm clipping and a step-decayed learning rate."""
from __future__ import annotations

import optax


def make_optimizer(train_config, steps_per_epoch: int) -> optax.GradientTransformation:
    """AdamW(lr, weight decay) after clipping at `grad_clip`; lr x `lr_decay` every `lr_decay_epochs`."""
    schedule = optax.exponential_decay(
        init_value=train_config.lr,
        transition_steps=max(1, int(train_config.lr_decay_epochs * steps_per_epoch)),
        decay_rate=train_config.lr_decay,
        staircase=True,
    )
    return optax.chain(
        optax.clip_by_global_norm(train_config.grad_clip),
        optax.adamw(schedule, weight_decay=train_config.weight_decay),
    )
