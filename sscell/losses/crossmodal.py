"""Cross-modality prediction (the study's CITE-seq task): the encoder plus a regression head that
predicts log1p of a cell's protein counts from its RNA, trained with mean squared error.

The head sees the embedding and the cell's batch (dataset) one-hot, as in the study: Dense(embedding)
+ a per-batch shift, which is a Dense layer over [embedding, one-hot] with the one-hot's weights
started at zero. A batch the run never trained on (an out-of-distribution one) keeps a zero shift.
Needs `config.data.modality` (e.g. "protein_counts"), so that batches carry the proteins.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sscell.data.modality import BATCH_FIELD
from sscell.errors import SscellError
from sscell.losses.registry import register
from sscell.models.mlp import MLP, encoder


class ModalityRegressor(nn.Module):
    """`encoder` (an MLP ending in the embedding), then Dense(n_outputs) + a per-batch shift."""

    n_genes: int
    n_outputs: int
    n_batches: int
    encoder: MLP

    def setup(self):
        self.head = nn.Dense(self.n_outputs)
        self.batch_shift = nn.Embed(self.n_batches, self.n_outputs, embedding_init=nn.initializers.zeros)

    def __call__(self, x: jax.Array, batch: jax.Array | None = None, train: bool = False) -> jax.Array:
        """Predicted log1p counts (cells, n_outputs); `batch`: each cell's dataset code (default 0)."""
        batch = jnp.zeros(x.shape[0], jnp.int32) if batch is None else batch
        return self.head(self.encode(x, train)) + self.batch_shift(batch)

    def encode(self, x: jax.Array, train: bool = False) -> jax.Array:
        """The embedding of each cell."""
        return self.encoder(x, train)


def build_regressor(config, info) -> ModalityRegressor:
    """The regressor of a run config for `info.n_genes` genes and `info.modality_features` outputs,
    with one batch shift per dataset of the store."""
    if not info.modality_features:
        raise SscellError(f"loss {config.loss.name} predicts a second modality: set data.modality (e.g. "
                          "--config.data.modality=protein_counts) on a store that holds it")
    return ModalityRegressor(n_genes=info.n_genes, n_outputs=info.modality_features,
                             n_batches=max(1, len(info.measured_table())), encoder=encoder(config.model))


def rowwise_pearson(a: jax.Array, b: jax.Array) -> jax.Array:
    """Pearson correlation of each row of `a` with the same row of `b` (0 for a constant row)."""
    a, b = a - a.mean(-1, keepdims=True), b - b.mean(-1, keepdims=True)
    norm = jnp.sqrt(jnp.sum(a * a, -1) * jnp.sum(b * b, -1))
    return jnp.where(norm > 0, jnp.sum(a * b, -1) / jnp.maximum(norm, 1e-12), 0.0)


@register("protein_regression", build_model=build_regressor)
def protein_regression_loss(params, batch, key, *, model, config, train=True, extra=None, info=None):
    """Mean squared error of the predicted vs the measured log1p protein counts, over cells and
    proteins; also reports the mean per-cell Pearson correlation (the study's headline)."""
    target = jnp.log1p(batch[BATCH_FIELD])
    predicted = model.apply({"params": params}, batch["x"], batch["dataset"], train=train, rngs={"dropout": key})
    loss = jnp.mean(jnp.square(predicted - target))
    return loss, {"loss": loss, "pearson_cell": jnp.mean(rowwise_pearson(predicted, target))}
