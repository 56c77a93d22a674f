"""Encoder + projector (+ predictor) for the contrastive tasks (BYOL, Barlow Twins)."""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sscell.models.mlp import ACTIVATIONS, MLP, encoder


def standardise(h: jax.Array, eps: float = 1e-5) -> jax.Array:
    """Each feature to mean 0, variance 1 over the batch (batch norm's normalisation)."""
    mean = h.mean(axis=0)
    return (h - mean) * jax.lax.rsqrt(jnp.square(h - mean).mean(axis=0) + eps)


class BatchNormMLP(nn.Module):
    """Dense -> batch norm -> activation between layers; the last layer is plain Dense.

    Batch norm here always uses the current batch's statistics and keeps no running averages:
    projectors only exist for the pretext loss, never for embeddings, so this keeps the loss
    a pure function of (params, batch). Under a data-parallel jit the mean is over the global
    batch (synchronised batch norm for free).
    """

    widths: Sequence[int]
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.widths):
            x = nn.Dense(width, name=f"dense_{i}")(x)
            if i < len(self.widths) - 1:
                scale = self.param(f"scale_{i}", nn.initializers.ones, (width,))
                bias = self.param(f"bias_{i}", nn.initializers.zeros, (width,))
                x = ACTIVATIONS[self.activation](standardise(x) * scale + bias)
        return x


class Siamese(nn.Module):
    """Encoder, projector and (BYOL only, empty `predictor` otherwise) predictor."""

    n_genes: int
    encoder: MLP
    projector: Sequence[int]
    predictor: Sequence[int] = ()

    def setup(self):
        self.project_mlp = BatchNormMLP(self.projector)
        self.predict_mlp = BatchNormMLP(self.predictor) if self.predictor else None

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """(projection, prediction) of each cell; prediction is the projection without a predictor."""
        projection = self.project_mlp(self.encode(x, train))
        return projection, self.predict_mlp(projection) if self.predict_mlp else projection

    def encode(self, x: jax.Array, train: bool = False) -> jax.Array:
        """The embedding of each cell."""
        return self.encoder(x, train)


def build_siamese(config, info, predictor: Sequence[int] = ()) -> Siamese:
    """Encoder and `config.loss.projector`, plus a `predictor` of these widths if given."""
    return Siamese(n_genes=info.n_genes, encoder=encoder(config.model), projector=tuple(config.loss.projector),
                   predictor=tuple(predictor))
