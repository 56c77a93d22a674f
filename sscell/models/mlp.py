"""The study's MLP autoencoder: encoder G -> ... -> latent, mirrored decoder, SELU, dropout."""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import sparse as jax_sparse

from sscell.models.hash_random import bernoulli
from sscell.models.precision import resolve_dtype

ACTIVATIONS = {"selu": nn.selu, "relu": nn.relu, "gelu": nn.gelu, "silu": nn.silu}
NORMS = ("none", "layer")
HEADS = ("mse", "nb")


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """`y + bias` over the last axis, whose bias gradient is a ones-vector matmul, not a reduction.

    XLA:CPU (jax 0.10) runs the column sum of a (1,024, 19,331) gradient ~30x slower as a reduce
    than as the same sum written as a matmul; the study model's train step gains ~5%.
    """
    return y + bias


def _add_bias_forward(y, bias):
    return y + bias, None


def _add_bias_backward(_, grad):
    rows = grad.reshape(-1, grad.shape[-1])
    return grad, (jnp.ones((1, rows.shape[0]), grad.dtype) @ rows)[0]


add_bias.defvjp(_add_bias_forward, _add_bias_backward)


def dense_parameters(module: nn.Module, x: jax.Array, features: int, dtype: str):
    """`x`, kernel and bias (nn.Dense's names and initialisers) of a compact `module`, in `dtype`."""
    kernel = module.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], features))
    bias = module.param("bias", nn.initializers.zeros, (features,))
    return (a.astype(dtype) for a in (x, kernel, bias))


def row_major_transpose(a: jax.Array) -> jax.Array:
    """`a.T`, written out in row-major order.

    XLA:CPU (jax 0.10) sends a bfloat16 matmul to its fast kernels (YNNPACK, AMX) only when
    both operands are row-major and in (m, k) @ (k, n) form; a plain `a.T` is a column-major
    view, which sends the product to a float32 fallback ~4x slower. The barrier keeps XLA from
    folding the copy back into a view. Other backends take transposed operands as they are.
    """
    if jax.default_backend() != "cpu":
        return a.T
    return jax.lax.optimization_barrier(a.T[:, None, :])[:, 0]


@jax.custom_vjp
def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`x @ kernel` in `x`'s (low-precision) dtype with a float32 result, for a float32 `kernel`
    (its gradient is float32, accumulated at full precision). The backward products are
    (m, k) @ (k, n) products of row-major operands, the form XLA:CPU runs on its bfloat16
    matrix units."""
    return jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)


def _matmul_forward(x, kernel):
    return matmul(x, kernel), (x, kernel.astype(x.dtype))


def _matmul_backward(residuals, grad):
    x, kernel = residuals
    grad = grad.astype(x.dtype)
    dx = jnp.dot(grad, row_major_transpose(kernel), preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), jnp.dot(row_major_transpose(x), grad, preferred_element_type=jnp.float32)


matmul.defvjp(_matmul_forward, _matmul_backward)


class Dense(nn.Module):
    """`nn.Dense` (same parameters and initialisers) with `add_bias`'s cheap gradient; in a
    low-precision `dtype`, a `matmul` with float32 results (bias and activations in float32)."""

    features: int
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias = dense_parameters(self, x, self.features, "float32")
        return add_bias(x @ kernel if self.dtype == "float32" else matmul(x.astype(self.dtype), kernel), bias)


class SparseInputDense(nn.Module):
    """`nn.Dense` (same parameters, same outputs) for inputs that are mostly zeros.

    Single-cell inputs are 90-97% zeros (after masking): the product runs over at most
    `nonzeros_per_cell` stored entries per cell (a BCOO matrix), so its cost follows the
    nonzeros, not the genes. A batch with more nonzeros than that takes the dense product,
    so the result never depends on the setting.
    """

    features: int
    nonzeros_per_cell: int
    dtype: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias = dense_parameters(self, x, self.features, self.dtype)
        stored = x.shape[0] * min(self.nonzeros_per_cell, x.shape[-1])

        def sparse_product(x):
            return jax_sparse.BCOO.fromdense(x, nse=stored) @ kernel

        fits = jnp.count_nonzero(x) <= stored
        return add_bias(jax.lax.cond(fits, sparse_product, lambda x: x @ kernel, x), bias)


class Dropout(nn.Module):
    """`nn.Dropout` (inverted dropout, rng collection "dropout") drawing its mask with
    `sscell.models.hash_random`, which costs a fraction of `jax.random.bernoulli` on CPU."""

    rate: float
    deterministic: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep = bernoulli(self.make_rng("dropout"), 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.rate), 0.0)


class MLP(nn.Module):
    """Dense layers of the given widths; [norm,] activation and dropout after all but the last.

    `dtype` is the compute dtype (e.g. bfloat16); parameters stay float32 and the output is
    cast back to float32, so losses are computed in full precision. `sparse_nonzeros` > 0 makes
    the first layer a `SparseInputDense` for that many nonzeros per cell.
    """

    widths: Sequence[int]
    activation: str = "selu"
    dropout: float = 0.1
    norm: str = "none"
    dtype: str = "float32"
    sparse_nonzeros: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        for i, width in enumerate(self.widths):
            if i == 0 and self.sparse_nonzeros > 0:
                x = SparseInputDense(width, self.sparse_nonzeros, self.dtype, name="dense_0")(x)
            else:
                x = Dense(width, self.dtype, name=f"dense_{i}")(x)
            if i < len(self.widths) - 1:
                if self.norm == "layer":
                    x = nn.LayerNorm(dtype=self.dtype, name=f"norm_{i}")(x)
                x = Dropout(self.dropout, deterministic=not train)(act(x))
        return x.astype(jnp.float32)


def encoder(model_config) -> MLP:
    """The encoder a `config.model` section describes: hidden widths, then the embedding."""
    return MLP((*model_config.hidden, model_config.latent), model_config.activation, model_config.dropout,
               model_config.norm, resolve_dtype(model_config.dtype), model_config.sparse_nonzeros)


class Embedder(nn.Module):
    """An encoder alone as a model with `encode` (a bundle's, evaluated on a store): `encoder`'s
    output through `output_activation` ("none"; "relu" for the study's zero-shot embedding,
    `sscell.evaluation.run.bundle_embedder`)."""

    encoder: MLP
    output_activation: str = "none"

    def encode(self, x: jax.Array, train: bool = False) -> jax.Array:
        z = self.encoder(x, train)
        return z if self.output_activation == "none" else ACTIVATIONS[self.output_activation](z)


def nb_mean(logits: jax.Array, library: jax.Array, measured: jax.Array) -> jax.Array:
    """The "nb" head's expected counts: each measured gene's softmax share of the cell's library
    (unmeasured genes get none)."""
    return jax.nn.softmax(jnp.where(measured, logits, jnp.finfo(logits.dtype).min), axis=-1) * library


class Autoencoder(nn.Module):
    """Encoder to a `latent`-dimensional embedding and a mirrored decoder back to `n_genes`.

    head "mse": the decoder outputs log1p values, unbounded (they reach ~9: no sigmoid, unlike
    the study's released code). head "nb": the decoder outputs logits of each gene's share of
    the library (negative-binomial mean = softmax(logits) * library) and the model holds a
    per-gene log inverse dispersion `log_theta`. `output_activation` "sigmoid" squashes the "mse"
    head's output as the study's MLPAutoEncoder does (for its imported checkpoints only).
    """

    n_genes: int
    hidden: Sequence[int] = (512, 512, 256, 256)
    latent: int = 64
    activation: str = "selu"
    dropout: float = 0.1
    norm: str = "none"
    dtype: str = "float32"
    head: str = "mse"
    sparse_nonzeros: int = 0
    output_activation: str = "none"

    def setup(self):
        self.encoder = MLP((*self.hidden, self.latent), self.activation, self.dropout, self.norm, self.dtype,
                           self.sparse_nonzeros)
        self.decoder = MLP((*reversed(self.hidden), self.n_genes), self.activation, self.dropout,
                           self.norm, self.dtype)
        if self.head == "nb":
            self.log_theta = self.param("log_theta", nn.initializers.zeros, (self.n_genes,))

    def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """Returns (decoder output, embedding)."""
        z = self.encode(x, train)
        out = self.decoder(z, train)
        return (jax.nn.sigmoid(out) if self.output_activation == "sigmoid" else out), z

    def encode(self, x: jax.Array, train: bool = False) -> jax.Array:
        """The embedding of each cell (the encoder's last layer, no activation)."""
        return self.encoder(x, train)

    def reconstruct(self, x: jax.Array, measured: jax.Array | None = None, train: bool = False) -> jax.Array:
        """The reconstruction in log1p(counts per 10k) space, whatever the head.

        The "nb" head's shares are a softmax over the `measured` genes only (all if None), as in
        its loss: unmeasured genes get no mass (log1p 0 = 0) and the measured ones share 10k.
        """
        out, _ = self(x, train)
        if self.head != "nb":
            return out
        return jnp.log1p(nb_mean(out, 1e4, jnp.ones_like(out, bool) if measured is None else measured))


def build_autoencoder(config, info) -> Autoencoder:
    """The autoencoder of a run config (`model` section, `loss.likelihood` head) for `info.n_genes`."""
    m = config.model
    return Autoencoder(n_genes=info.n_genes, hidden=tuple(m.hidden), latent=m.latent, activation=m.activation,
                       dropout=m.dropout, norm=m.norm, dtype=resolve_dtype(m.dtype),
                       head=config.loss.get("likelihood", "mse"), sparse_nonzeros=m.sparse_nonzeros,
                       output_activation=m.get("output_activation", "none"))


def init_params(model: nn.Module, key: jax.Array) -> dict:
    """Parameters (float32) of any sscell model (it has `n_genes` and takes (cells, genes)), from a key."""
    return model.init(key, jnp.zeros((2, model.n_genes), jnp.float32))["params"]
