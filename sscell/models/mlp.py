"""The study's MLP autoencoder: encoder G -> ... -> latent, mirrored decoder, SELU, dropout."""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = {"selu": nn.selu, "relu": nn.relu, "gelu": nn.gelu, "silu": nn.silu}


class MLP(nn.Module):
    """Dense layers of the given widths; activation and dropout after all but the last."""

    widths: Sequence[int]
    activation: str = "selu"
    dropout: float = 0.1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        for i, width in enumerate(self.widths):
            x = nn.Dense(width, name=f"dense_{i}")(x)
            if i < len(self.widths) - 1:
                x = nn.Dropout(self.dropout, deterministic=not train)(act(x))
        return x


class Autoencoder(nn.Module):
    """Encoder to a `latent`-dimensional embedding and a mirrored decoder back to `n_genes`.

    The decoder's output is unbounded (log1p values reach ~9): no sigmoid, unlike the
    study's released code.
    """

    n_genes: int
    hidden: Sequence[int] = (512, 512, 256, 256)
    latent: int = 64
    activation: str = "selu"
    dropout: float = 0.1

    def setup(self):
        self.encoder = MLP((*self.hidden, self.latent), self.activation, self.dropout)
        self.decoder = MLP((*reversed(self.hidden), self.n_genes), self.activation, self.dropout)

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """Returns (reconstruction, embedding)."""
        z = self.encode(x, train)
        return self.decoder(z, train), z

    def encode(self, x: jax.Array, train: bool = False) -> jax.Array:
        """The embedding of each cell (the encoder's last layer, no activation)."""
        return self.encoder(x, train)


def build_model(model_config, n_genes: int) -> Autoencoder:
    """The autoencoder described by a `config.model` section for a vocabulary of `n_genes`."""
    return Autoencoder(
        n_genes=n_genes,
        hidden=tuple(model_config.hidden),
        latent=model_config.latent,
        activation=model_config.activation,
        dropout=model_config.dropout,
    )


def init_params(model: Autoencoder, key: jax.Array) -> dict:
    """Parameters for `model` (float32), from a PRNG key."""
    return model.init(key, jnp.zeros((1, model.n_genes), jnp.float32))["params"]
