"""Cross-modality prediction (the study's CITE-seq task, and multiome ATAC): the encoder plus a
regression head that predicts a cell's second modality from its RNA, trained with mean squared
error: `protein_regression` on log1p protein counts, `atac_regression` on the TF-IDF of its peaks
(`tfidf`, computed in jit from the batch's flat peak nonzeros and the train split's IDF held in
`TaskInfo.modality_idf`).

The head sees the embedding and the cell's batch (dataset) one-hot, as in the study: Dense(embedding)
+ a per-batch shift, which is a Dense layer over [embedding, one-hot] with the one-hot's weights
started at zero. A batch the run never trained on (an out-of-distribution one) keeps a zero shift.
Needs `config.data.modality` ("protein_counts" or "atac_counts"), so that batches carry them.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sscell.data.preprocess import BATCH_FIELD, PEAK_FIELDS, densify
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
    if (config.loss.name == "atac_regression") != bool(info.modality_idf.size):
        wanted = "atac_counts" if config.loss.name == "atac_regression" else "protein_counts"
        raise SscellError(f"loss {config.loss.name} predicts obsm['{wanted}'], data.modality is "
                          f"{config.data.modality!r}; set --config.data.modality={wanted}")
    return ModalityRegressor(n_genes=info.n_genes, n_outputs=info.modality_features,
                             n_batches=max(1, len(info.measured_table())), encoder=encoder(config.model))


def rowwise_pearson(a: jax.Array, b: jax.Array) -> jax.Array:
    """Pearson correlation of each row of `a` with the same row of `b` (0 for a constant row)."""
    a, b = a - a.mean(-1, keepdims=True), b - b.mean(-1, keepdims=True)
    norm = jnp.sqrt(jnp.sum(a * a, -1) * jnp.sum(b * b, -1))
    return jnp.where(norm > 0, jnp.sum(a * b, -1) / jnp.maximum(norm, 1e-12), 0.0)


def tfidf(counts: jax.Array, idf: jax.Array, scale: float = 1e4) -> jax.Array:
    """The LSI TF-IDF of peak counts (cells x peaks; Cusanovich et al. 2018): tf = counts / the
    cell's total, times `idf` = log(1 + n_cells / cells with the peak), scaled by `scale` (as
    Signac's RunTFIDF) and log1p'd. Cells without counts stay 0. Works on numpy arrays too."""
    total = counts.sum(-1, keepdims=True)
    tf = jnp.where(total > 0, counts / jnp.maximum(total, 1e-12), 0.0)
    return jnp.log1p(scale * tf * idf)


def modality_target(batch: dict, info) -> jax.Array:
    """What the regression predicts for a loss batch: log1p protein counts, or the TF-IDF of the
    peaks (densified from the flat PEAK_FIELDS)."""
    if PEAK_FIELDS[0] in batch:
        peaks = densify(*(batch[f] for f in PEAK_FIELDS), info.modality_features)
        return tfidf(peaks, jnp.asarray(info.modality_idf))
    return jnp.log1p(batch[BATCH_FIELD])


def regression_loss(params, batch, key, *, model, config, train=True, extra=None, info=None):
    """Mean squared error of the predicted vs the measured target (`modality_target`) over cells
    and features; also reports the mean per-cell Pearson correlation (the study's headline)."""
    target = modality_target(batch, info)
    predicted = model.apply({"params": params}, batch["x"], batch["dataset"], train=train, rngs={"dropout": key})
    loss = jnp.mean(jnp.square(predicted - target))
    return loss, {"loss": loss, "pearson_cell": jnp.mean(rowwise_pearson(predicted, target))}


register("protein_regression", build_model=build_regressor)(regression_loss)
register("atac_regression", build_model=build_regressor)(regression_loss)
