"""The MLP autoencoder and the masking loss against numpy references."""
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.stats

from sscell.errors import SscellError
from sscell.losses import get_loss
from sscell.losses.masking import mask_input, random_gene_mask
from sscell.models.hash_random import bernoulli, normal, open_unit_interval
from sscell.models.mlp import Autoencoder, Dense, Dropout, init_params, matmul, row_major_transpose
from sscell.models.precision import resolve_dtype

SELU_ALPHA, SELU_SCALE = 1.6732632423543772, 1.0507009873554805


def numpy_selu(x):
    return SELU_SCALE * np.where(x > 0, x, SELU_ALPHA * np.expm1(np.minimum(x, 0)))


def numpy_mlp(layers, x):
    for i, layer in enumerate(layers):
        x = x @ np.asarray(layer["kernel"]) + np.asarray(layer["bias"])
        if i < len(layers) - 1:
            x = numpy_selu(x)
    return x


def model_and_params(n_genes=24, dropout=0.0):
    model = Autoencoder(n_genes=n_genes, hidden=(16, 12), latent=4, dropout=dropout)
    return model, init_params(model, jax.random.key(0))


def dense_layers(tree):
    return [tree[f"dense_{i}"] for i in range(len(tree))]


@pytest.mark.slow
def test_autoencoder_matches_numpy_mlp():
    model, params = model_and_params()
    x = np.random.default_rng(0).random((5, 24)).astype(np.float32) * 3
    reconstruction, z = model.apply({"params": params}, x)
    z_ref = numpy_mlp(dense_layers(params["encoder"]), x)
    np.testing.assert_allclose(np.asarray(z), z_ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(reconstruction), numpy_mlp(dense_layers(params["decoder"]), z_ref),
                               rtol=1e-4, atol=1e-5)
    assert [p["kernel"].shape for p in dense_layers(params["encoder"])] == [(24, 16), (16, 12), (12, 4)]
    assert [p["kernel"].shape for p in dense_layers(params["decoder"])] == [(4, 12), (12, 16), (16, 24)]


def test_output_is_not_squashed():
    """log1p values reach ~9: the decoder must be able to output them (no sigmoid)."""
    model, params = model_and_params()
    params = jax.tree.map(lambda p: p, params)
    params["decoder"]["dense_2"]["bias"] = jnp.full(24, 9.0)
    reconstruction, _ = model.apply({"params": params}, np.zeros((2, 24), np.float32))
    assert float(reconstruction.max()) > 5


def test_mask_rate_and_inverted_dropout():
    mask = np.asarray(random_gene_mask(jax.random.key(1), (400, 500), 0.5))
    assert abs(mask.mean() - 0.5) < 0.005
    assert abs(mask.mean(1).std() - np.sqrt(0.25 / 500)) < 0.005  # independent per cell
    x = np.ones((400, 500), np.float32)
    masked = np.asarray(mask_input(x, mask, 0.5))
    np.testing.assert_array_equal(masked, np.where(mask, 0.0, 2.0))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_bernoulli_draws_have_the_rate_and_look_independent(p):
    """Binomial statistics of 200,000 draws: the rate, the spread of per-row rates, no correlation
    between neighbouring entries (along either axis) or between the draws of two keys."""
    shape = (400, 500)
    a = np.asarray(bernoulli(jax.random.key(0), p, shape), np.float64)
    b = np.asarray(bernoulli(jax.random.key(1), p, shape), np.float64)
    n, sd = a.size, np.sqrt(p * (1 - p))
    assert abs(a.mean() - p) < 5 * sd / np.sqrt(n)
    assert abs(a.mean(1).std() / (sd / np.sqrt(shape[1])) - 1) < 0.15  # rows vary like independent rows
    corr = [np.corrcoef(a[:, 1:].ravel(), a[:, :-1].ravel())[0, 1], np.corrcoef(a[1:].ravel(), a[:-1].ravel())[0, 1],
            np.corrcoef(a.ravel(), b.ravel())[0, 1]]
    assert np.all(np.abs(corr) < 5 / np.sqrt(n)), corr
    np.testing.assert_array_equal(np.asarray(bernoulli(jax.random.key(0), p, shape)), a.astype(bool))  # a pure function


def test_bernoulli_edge_rates():
    assert not np.asarray(bernoulli(jax.random.key(0), 0.0, (50, 60))).any()
    assert np.asarray(bernoulli(jax.random.key(0), 1.0, (50, 60))).all()
    with pytest.raises(SscellError, match="1.5 is not a probability"):
        bernoulli(jax.random.key(0), 1.5, (2,))


def test_normal_draws_are_standard_normal_and_finite_at_the_extreme_bits():
    draws = np.asarray(jax.jit(normal, static_argnums=1)(jax.random.key(3), (400, 500)), np.float64)
    assert abs(draws.mean()) < 0.01 and abs(draws.std() - 1.0) < 0.01
    assert abs(scipy.stats.skew(draws.ravel())) < 0.03 and abs(scipy.stats.kurtosis(draws.ravel())) < 0.05
    extremes = np.asarray(open_unit_interval(jnp.asarray([0, 2**32 - 1], jnp.uint32)))
    np.testing.assert_array_equal(extremes, [-1 + 2.0**-24, 1 - 2.0**-24])
    assert np.isfinite(np.asarray(jax.scipy.special.erfinv(extremes))).all()


def test_dense_equals_flax_dense_in_value_and_gradient():
    x = np.random.default_rng(4).normal(size=(2, 7, 5)).astype(np.float32)  # leading axes are flattened
    ours, flax_dense = Dense(3), nn.Dense(3)
    params = flax_dense.init(jax.random.key(0), x)["params"]
    assert jax.tree.map(np.shape, ours.init(jax.random.key(0), x)["params"]) == jax.tree.map(np.shape, params)

    def loss(module, p):
        return jnp.sum(jnp.sin(module.apply({"params": p}, x)))

    np.testing.assert_allclose(float(loss(ours, params)), float(loss(flax_dense, params)), rtol=1e-6)
    for got, want in zip(jax.tree.leaves(jax.grad(loss, 1)(ours, params)),
                         jax.tree.leaves(jax.grad(loss, 1)(flax_dense, params))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_dropout_zeroes_the_rate_and_rescales_survivors():
    x = np.ones((300, 400), np.float32)
    out = np.asarray(Dropout(0.1, deterministic=False).apply({}, x, rngs={"dropout": jax.random.key(2)}))
    assert set(np.unique(out)) == {0.0, np.float32(1 / 0.9)}
    assert abs((out == 0).mean() - 0.1) < 5 * np.sqrt(0.09 / out.size)
    np.testing.assert_array_equal(Dropout(0.1, deterministic=True).apply({}, x), x)


@pytest.mark.slow
def test_masked_loss_matches_numpy_reference():
    model, params = model_and_params()
    loss_fn = get_loss("masked")
    config = ml_collections.ConfigDict({"mask_rate": 0.3})
    x = np.random.default_rng(2).random((6, 24)).astype(np.float32) * 4
    key = jax.random.key(7)
    batch = {"x": x, "measured": np.ones_like(x, bool)}
    loss, metrics = loss_fn(params, batch, key, model=model, config=config, train=False)  # validation: diagnostics

    mask_key, _ = jax.random.split(key)
    mask = np.asarray(random_gene_mask(mask_key, x.shape, 0.3))
    inputs = np.where(mask, 0.0, x / 0.7)
    reconstruction = numpy_mlp(dense_layers(params["decoder"]), numpy_mlp(dense_layers(params["encoder"]), inputs))
    expected = ((reconstruction - x) ** 2 * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["mse_all"]), ((reconstruction - x) ** 2).mean(), rtol=1e-4)
    np.testing.assert_allclose(float(metrics["mask_fraction"]), mask.mean(), rtol=1e-6)
    train_loss, train_metrics = loss_fn(params, batch, key, model=model, config=config, train=True)
    assert float(train_loss) == float(loss) and set(train_metrics) == {"loss"}  # no dropout in this model

    grads = jax.grad(lambda p: loss_fn(p, batch, key, model=model, config=config)[0])(params)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and sum(norms) > 0


def test_dropout_only_in_training():
    model, params = model_and_params(dropout=0.5)
    x = np.random.default_rng(3).random((4, 24)).astype(np.float32)
    a = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(0)})[0]
    b = model.apply({"params": params}, x, train=False)[0]
    c = model.apply({"params": params}, x, train=False)[0]
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(b, c)


def test_unknown_loss_names_the_choices():
    with pytest.raises(SscellError, match="unknown loss 'nope'.*masked"):
        get_loss("nope")


def test_bfloat16_compute_keeps_float32_parameters_and_outputs():
    x = np.random.default_rng(4).random((8, 24)).astype(np.float32) * 3
    full = Autoencoder(n_genes=24, hidden=(16, 12), latent=4, dropout=0.0)
    half = Autoencoder(n_genes=24, hidden=(16, 12), latent=4, dropout=0.0, dtype="bfloat16")
    params = init_params(full, jax.random.key(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(init_params(half, jax.random.key(0))))
    (reference, _), (reduced, _) = full.apply({"params": params}, x), half.apply({"params": params}, x)
    assert reduced.dtype == jnp.float32
    assert not np.array_equal(np.asarray(reference), np.asarray(reduced))  # really computed in bf16
    np.testing.assert_allclose(np.asarray(reduced), np.asarray(reference), rtol=0.05, atol=0.05)


def bfloat16_values(a: np.ndarray) -> np.ndarray:
    """`a` rounded to bfloat16, as float64."""
    return np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64)


def test_bfloat16_matmul_and_its_gradients_match_numpy():
    rng = np.random.default_rng(7)
    x, kernel, grad = (rng.standard_normal(shape).astype(np.float32) for shape in ((8, 24), (24, 16), (8, 16)))
    y, backward = jax.vjp(matmul, jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel))
    dx, dkernel = backward(jnp.asarray(grad))
    assert (y.dtype, dx.dtype, dkernel.dtype) == (jnp.float32, jnp.bfloat16, jnp.float32)
    xb, kb, gb = bfloat16_values(x), bfloat16_values(kernel), bfloat16_values(grad)
    np.testing.assert_allclose(np.asarray(y), xb @ kb, rtol=1e-5, atol=1e-5)  # bf16 products, float32 sums
    np.testing.assert_allclose(np.asarray(dkernel), xb.T @ gb, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx, np.float64), bfloat16_values(gb @ kb.T), rtol=1e-2, atol=1e-2)


class FakeDevice:
    def __init__(self, platform, compute_capability=None):
        self.platform, self.compute_capability = platform, compute_capability


def test_auto_dtype_is_bfloat16_only_on_hardware_with_bfloat16_matrix_units():
    assert resolve_dtype("auto", FakeDevice("tpu")) == "bfloat16"
    assert resolve_dtype("auto", FakeDevice("gpu", "9.0")) == "bfloat16"  # H100
    assert resolve_dtype("auto", FakeDevice("gpu", "7.0")) == "float32"  # V100: no bfloat16 tensor cores
    assert resolve_dtype("auto", FakeDevice("gpu", "gfx90a")) == "float32"  # ROCm: not measured
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    bf16 = cpuinfo.exists() and not {"amx_bf16", "avx512_bf16"}.isdisjoint(cpuinfo.read_text().split())
    assert resolve_dtype("auto", FakeDevice("cpu")) == ("bfloat16" if bf16 else "float32")
    assert resolve_dtype("float32", FakeDevice("tpu")) == "float32"
    with pytest.raises(SscellError, match="unknown model.dtype 'fp16'; choose one of auto, float32, bfloat16"):
        resolve_dtype("fp16")


def dot_operand_dtypes(fn, *args) -> list[tuple[str, str]]:
    """(lhs, rhs) element types of every dot in the compiled (optimised) HLO of `fn`."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    dtypes = []
    for computation in re.split(r"\n(?=%|ENTRY)", text):
        for dot in re.finditer(r"= \S+ dot\(%([\w.-]+), %([\w.-]+)\)", computation):
            dtypes.append(tuple(re.search(re.escape(name) + r"(?:: | = )(\w+)\[", computation).group(1)
                                for name in dot.groups()))
    return dtypes


def test_bfloat16_backward_products_keep_bfloat16_operands():
    """XLA:CPU upcasts a bfloat16 product it cannot run on its matrix units to float32; the
    backward products of `matmul` stay bfloat16 where plain autodiff's do not."""
    x, kernel = jnp.ones((64, 128), jnp.bfloat16), jnp.ones((128, 32), jnp.float32)

    def plain(x, kernel):
        return jnp.dot(x, kernel.astype(jnp.bfloat16), preferred_element_type=jnp.float32).sum()
    if dot_operand_dtypes(plain, x, kernel) != [("bf16", "bf16")]:
        pytest.skip("this backend runs no bfloat16 product in bfloat16")
    assert ("f32", "f32") in dot_operand_dtypes(jax.grad(plain, argnums=(0, 1)), x, kernel)
    gradients = jax.grad(lambda x, kernel: matmul(x, kernel).sum(), argnums=(0, 1))
    assert dot_operand_dtypes(gradients, x, kernel) == [("bf16", "bf16")] * 2


def test_row_major_transpose_is_the_transpose():
    a = np.arange(15, dtype=np.float32).reshape(3, 5)
    np.testing.assert_array_equal(np.asarray(jax.jit(row_major_transpose)(a)), a.T)


@pytest.mark.slow
def test_bfloat16_gradients_follow_the_float32_gradients():
    x = np.random.default_rng(8).random((16, 24)).astype(np.float32) * 3
    full = Autoencoder(n_genes=24, hidden=(16, 12), latent=4, dropout=0.0)
    half = Autoencoder(n_genes=24, hidden=(16, 12), latent=4, dropout=0.0, dtype="bfloat16")
    params = init_params(full, jax.random.key(0))

    def loss(p, model):
        return jnp.mean((model.apply({"params": p}, x)[0] - x) ** 2)
    reference, reduced = jax.grad(loss)(params, full), jax.grad(loss)(params, half)
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(reduced), strict=True):
        assert b.dtype == jnp.float32
        cosine = float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
        assert cosine > 0.99, cosine


@pytest.mark.parametrize("nonzeros_per_cell", [6, 2])  # 2: too few for the batch, the dense fallback runs
@pytest.mark.slow
def test_sparse_input_layer_equals_the_dense_layer(nonzeros_per_cell):
    rng = np.random.default_rng(5)
    x = (rng.random((8, 24)) * (rng.random((8, 24)) < 0.2)).astype(np.float32)  # ~5 nonzeros per cell
    assert (np.count_nonzero(x) <= 8 * nonzeros_per_cell) == (nonzeros_per_cell == 6)  # which path runs
    dense = Autoencoder(n_genes=24, hidden=(16, 12), latent=4, dropout=0.0)
    sparse = Autoencoder(n_genes=24, hidden=(16, 12), latent=4, dropout=0.0, sparse_nonzeros=nonzeros_per_cell)
    params = init_params(dense, jax.random.key(0))
    assert jax.tree.structure(init_params(sparse, jax.random.key(0))) == jax.tree.structure(params)
    for a, b in zip(dense.apply({"params": params}, x), sparse.apply({"params": params}, x), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)

    def loss(p, model):
        return jnp.sum(model.apply({"params": p}, x)[0] ** 2)
    grads = jax.grad(loss)(params, dense), jax.grad(loss)(params, sparse)
    for a, b in zip(*(jax.tree.leaves(g) for g in grads), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sparse_input_layer_equals_the_dense_layer_in_the_masked_loss():
    """The training path: masked inputs, dropout on (the same draws in both models), loss and gradients."""
    rng = np.random.default_rng(6)
    x = (rng.random((8, 24)) * 4 * (rng.random((8, 24)) < 0.3)).astype(np.float32)
    batch = {"x": x, "measured": np.ones_like(x, bool)}
    config = ml_collections.ConfigDict({"mask_rate": 0.5})
    dense = Autoencoder(n_genes=24, hidden=(16, 12), latent=4, dropout=0.1)
    sparse = Autoencoder(n_genes=24, hidden=(16, 12), latent=4, dropout=0.1, sparse_nonzeros=6)
    params = init_params(dense, jax.random.key(0))
    loss_fn = get_loss("masked")

    def loss(p, model):
        return loss_fn(p, batch, jax.random.key(3), model=model, config=config, train=True)[0]
    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    (a, grads_a), (b, grads_b) = value_and_grad(params, dense), value_and_grad(params, sparse)
    np.testing.assert_allclose(float(b), float(a), rtol=1e-5)
    for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        np.testing.assert_allclose(np.asarray(gb), np.asarray(ga), rtol=1e-4, atol=1e-5)
