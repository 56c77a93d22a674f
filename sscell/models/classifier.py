"""The study's supervised baseline: the MLP encoder plus a linear layer to cell-type logits."""
from __future__ import annotations

import flax.linen as nn
import jax

from sscell.models.mlp import ACTIVATIONS, MLP, encoder


class Classifier(nn.Module):
    """`encoder` (an MLP ending in the embedding), then Dense(n_classes); `head_activation` (e.g.
    "relu", as the study's MLPClassifier) applied to the embedding before the head, "none" by default."""

    n_genes: int
    n_classes: int
    encoder: MLP
    head_activation: str = "none"

    def setup(self):
        self.head = nn.Dense(self.n_classes)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Cell-type logits (cells, n_classes)."""
        return self.classify(self.encode(x, train))

    def classify(self, z: jax.Array) -> jax.Array:
        """Logits of embeddings `z`."""
        return self.head(z if self.head_activation == "none" else ACTIVATIONS[self.head_activation](z))

    def encode(self, x: jax.Array, train: bool = False) -> jax.Array:
        """The embedding of each cell."""
        return self.encoder(x, train)


def build_classifier(config, info) -> Classifier:
    """The classifier of a run config for `info.n_genes` genes and `info.n_cell_types` classes."""
    return Classifier(n_genes=info.n_genes, n_classes=info.n_cell_types, encoder=encoder(config.model),
                      head_activation=config.model.get("head_activation", "none"))
