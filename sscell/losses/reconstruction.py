"""Reconstruction losses on chosen genes: MSE on log1p values or a negative-binomial likelihood on counts."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln

from sscell.models.mlp import nb_mean


def masked_mean(values: jax.Array, where: jax.Array) -> jax.Array:
    """Mean of `values` over the True entries of `where` (0 when there are none)."""
    # A float count fuses into the reduction; an integer one materialises a cells x genes int32 copy.
    return jnp.sum(jnp.where(where, values, 0.0)) / jnp.maximum(jnp.sum(where, dtype=jnp.float32), 1.0)


def nb_log_likelihood(counts: jax.Array, mean: jax.Array, theta: jax.Array, eps: float = 1e-8) -> jax.Array:
    """log NB(counts | mean, inverse dispersion theta), elementwise (variance = mean + mean^2 / theta)."""
    log_theta_mean = jnp.log(theta + mean + eps)
    return (gammaln(counts + theta) - gammaln(theta) - gammaln(counts + 1)
            + theta * (jnp.log(theta + eps) - log_theta_mean)
            + counts * (jnp.log(mean + eps) - log_theta_mean))


def reconstruction_loss(output: jax.Array, params: dict, batch: dict, target: jax.Array,
                        likelihood: str, diagnostics: bool = True) -> tuple[jax.Array, dict]:
    """Loss of the decoder `output` on the genes where `target` (and `batch["measured"]`) holds.

    "mse": mean squared error against log1p values `batch["x"]`; "nb": mean negative-binomial
    negative log-likelihood of `batch["counts"]` with mean softmax(output) * library and the
    model's per-gene `log_theta`. `diagnostics` adds "mse_all", the MSE over all measured genes
    (one more pass over the cells x genes batch, so train steps leave it to validation).
    """
    where = target & batch["measured"]
    if likelihood == "nb":
        mean = nb_mean(output, batch["library"], batch["measured"])
        nll = -nb_log_likelihood(batch["counts"], mean, jnp.exp(params["log_theta"]))
        loss = masked_mean(nll, where)
        return loss, {"nb_nll": loss}
    squared_error = jnp.square(output - batch["x"])
    metrics = {"mse_all": masked_mean(squared_error, batch["measured"])} if diagnostics else {}
    return masked_mean(squared_error, where), metrics
