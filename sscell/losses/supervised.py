"""The supervised baseline: cell-type classification with class-weighted cross-entropy."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

from sscell.losses.registry import register
from sscell.models.classifier import build_classifier


def balanced_weights(class_counts: np.ndarray) -> np.ndarray:
    """scikit-learn's 'balanced' class weights, n / (classes present * count); 0 for absent classes."""
    counts = np.asarray(class_counts, np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.astype(np.float32)


@register("supervised", build_model=build_classifier)
def classification_loss(params, batch, key, *, model, config, train=True, extra=None, info=None):
    """Weighted mean cross-entropy, sum_i w[y_i] CE_i / sum_i w[y_i]; `config.class_weights` is
    "balanced" (from the training split's class counts) or "none"."""
    x = jnp.where(batch["measured"], batch["x"], 0.0)
    logits = model.apply({"params": params}, x, train=train, rngs={"dropout": key})
    labels = batch["cell_type"]
    if config.get("class_weights", "balanced") == "balanced":
        w = jnp.asarray(balanced_weights(info.class_counts))[labels]
    else:
        w = jnp.ones(labels.shape, jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    loss = jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1e-12)
    return loss, {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
