"""Reconstruction tasks (random / programme masking, GP -> TF, GP -> GP; MSE and NB heads)
against numpy references, on the batches the train step builds."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
from scipy.special import gammaln, softmax

from sscell.config import default_config
from sscell.data.loader import shard_nonzeros
from sscell.data.task_data import TaskInfo
from sscell.losses import get_task
from sscell.losses.masking import random_gene_mask
from sscell.losses.programmes import choose_programmes, cover, one_programme_views
from sscell.models.mlp import init_params
from sscell.training.step import task_batch

N_CELLS, N_GENES = 12, 20
# three programmes over 20 genes; for GP -> TF, gene 15 / 16 / 17 is each programme's TF
PROGRAMMES = np.zeros((3, N_GENES), bool)
PROGRAMMES[0, 0:5] = PROGRAMMES[1, 4:10] = PROGRAMMES[2, 10:14] = True
TFS = np.array([15, 16, 17], np.int32)
MEASURED = np.ones((2, N_GENES), bool)
MEASURED[1, [1, 6, 11, 15, 19]] = False  # dataset 1 did not measure these genes


def raw_batch(seed=0, counts=None):
    rng = np.random.default_rng(seed)
    cell_type = rng.integers(0, 3, N_CELLS).astype(np.int32)
    if counts is None:
        counts = rng.negative_binomial(2, 0.3, (N_CELLS, N_GENES)).astype(np.float32)
    matrix = sp.csr_matrix(counts)
    return {**shard_nonzeros(matrix.data, matrix.indices, np.diff(matrix.indptr)),
            "dataset": np.arange(N_CELLS, dtype=np.int32) % 2, "cell_type": cell_type}, counts


def setup(name, **loss):
    config = default_config()
    config.model.update(hidden=(16, 12), latent=4, dropout=0.0)
    config.loss.update(name=name, **loss)
    task = get_task(name)
    info = TaskInfo(n_genes=N_GENES, n_cell_types=3, class_counts=np.array([5, 3, 4]), measured=MEASURED,
                    programmes=PROGRAMMES, programme_names=("a", "b", "c"), programme_genes=TFS)
    model = task.build_model(config, info)
    params = init_params(model, jax.random.key(0))
    extra = task.init_extra(params, config)

    @jax.jit
    def loss(params, batch, key):
        return task.loss(params, batch, key, model=model, config=config.loss, extra=extra, info=info)
    return loss, model, params, info


def batch_for(raw):
    return task_batch(raw, N_GENES, MEASURED)


def assert_finite_nonzero_grad(loss, params, batch, key):
    grads = jax.grad(lambda p: loss(p, batch, key)[0])(params)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert np.all(np.isfinite(norms)) and sum(norms) > 0


def test_task_batch_normalises_measured_counts_only():
    raw, counts = raw_batch()
    batch = batch_for(raw)
    measured = MEASURED[raw["dataset"]]
    kept = np.where(measured, counts, 0)
    np.testing.assert_array_equal(np.asarray(batch["measured"]), measured)
    np.testing.assert_allclose(np.asarray(batch["library"])[:, 0], kept.sum(1))
    np.testing.assert_allclose(np.asarray(batch["x"]), np.log1p(kept / kept.sum(1, keepdims=True) * 1e4), rtol=1e-5)


@pytest.mark.parametrize("rescale", [True, False])
def test_masked_mse_matches_numpy_and_ignores_unmeasured_genes(rescale):
    loss, model, params, _ = setup("masked", mask_rate=0.3, rescale_inputs=rescale)
    raw, _ = raw_batch()
    batch, key = batch_for(raw), jax.random.key(3)
    value, _ = loss(params, batch, key)
    mask = np.asarray(random_gene_mask(jax.random.split(key)[0], (N_CELLS, N_GENES), 0.3))
    x, measured = np.asarray(batch["x"]), np.asarray(batch["measured"])
    output = np.asarray(model.apply({"params": params}, np.where(mask, 0.0, x / 0.7 if rescale else x))[0])
    where = mask & measured
    np.testing.assert_allclose(float(value), ((output - x) ** 2)[where].mean(), rtol=1e-5)
    assert_finite_nonzero_grad(loss, params, batch, key)


def test_nb_head_matches_numpy_likelihood():
    loss, model, params, _ = setup("masked", mask_rate=0.5, likelihood="nb")
    params = {**params, "log_theta": jnp.linspace(-1.0, 2.0, N_GENES)}
    raw, _ = raw_batch(1)
    batch, key = batch_for(raw), jax.random.key(4)
    value, _ = loss(params, batch, key)
    mask = np.asarray(random_gene_mask(jax.random.split(key)[0], (N_CELLS, N_GENES), 0.5))
    x, counts, measured = (np.asarray(batch[k], np.float64) for k in ("x", "counts", "measured"))
    measured = measured.astype(bool)
    logits = np.asarray(model.apply({"params": params}, np.where(mask, 0.0, x / 0.5))[0], np.float64)
    mean = softmax(np.where(measured, logits, -np.inf), axis=1) * counts.sum(1, keepdims=True)
    theta = np.exp(np.asarray(params["log_theta"], np.float64))
    log_p = (gammaln(counts + theta) - gammaln(theta) - gammaln(counts + 1)
             + theta * np.log(theta / (theta + mean)) + counts * np.log(np.where(mean > 0, mean, 1) / (theta + mean)))
    np.testing.assert_allclose(float(value), -log_p[mask & measured].mean(), rtol=1e-4)
    assert_finite_nonzero_grad(loss, params, batch, key)


def test_reconstruction_shows_log1p_means_for_nb_over_measured_genes_only():
    _, model, params, _ = setup("masked", likelihood="nb")
    x = np.random.default_rng(0).random((4, N_GENES)).astype(np.float32)
    measured = MEASURED[np.arange(4) % 2]  # cells of dataset 1 miss 5 genes
    logits = np.asarray(model.apply({"params": params}, x)[0], np.float64)
    shown = np.asarray(model.apply({"params": params}, x, measured, method="reconstruct"), np.float64)
    shares = np.expm1(shown) / 1e4
    assert (shares[~measured] == 0).all()  # no mass leaks onto genes the cell's dataset did not measure
    np.testing.assert_allclose(shares.sum(1), 1.0, rtol=1e-5)  # the measured genes share the whole library
    np.testing.assert_allclose(shares, softmax(np.where(measured, logits, -np.inf), axis=1), rtol=1e-4, atol=1e-9)
    everything = np.asarray(model.apply({"params": params}, x, method="reconstruct"), np.float64)  # no mask
    np.testing.assert_allclose(np.expm1(everything) / 1e4, softmax(logits, axis=1), rtol=1e-4)


@pytest.mark.parametrize("per_cell", [True, False])
def test_programme_masks_cover_exactly_the_chosen_programmes(per_cell):
    chosen = np.asarray(choose_programmes(jax.random.key(0), 200, 8, 0.25, per_cell))
    assert (chosen.sum(1) == 2).all()
    assert (len({row.tobytes() for row in chosen}) > 1) == per_cell
    membership = np.random.default_rng(0).random((8, 30)) < 0.2
    mask = np.asarray(cover(chosen, membership))
    expected = np.array([membership[row].any(0) for row in chosen])
    np.testing.assert_array_equal(mask, expected)
    # uniform over programmes: over 200 cells (per-cell masks) or over 200 batches (one mask each)
    draws = chosen if per_cell else np.concatenate(
        [np.asarray(choose_programmes(jax.random.key(i), 3, 8, 0.25, per_cell))[:1] for i in range(200)])
    assert np.abs(draws.mean(0) - 0.25).max() < 0.1


@pytest.mark.parametrize("rescale", [True, False])
def test_programme_masking_matches_numpy(rescale):
    loss, model, params, _ = setup("gp_masked", mask_rate=0.34, rescale_inputs=rescale)
    raw, _ = raw_batch(2)
    batch, key = batch_for(raw), jax.random.key(5)
    value, _ = loss(params, batch, key)
    chosen = np.asarray(choose_programmes(jax.random.split(key)[0], N_CELLS, 3, 0.34))
    hidden = np.array([PROGRAMMES[row].any(0) for row in chosen])
    x, measured = np.asarray(batch["x"]), np.asarray(batch["measured"])
    # as random masking: survivors scaled by 1 / (1 - share of the cell's measured genes hidden)
    share = (hidden & measured).sum(1, keepdims=True) / measured.sum(1, keepdims=True)
    assert share.min() < share.max()  # programmes of different sizes: the share is per cell
    inputs = np.where(hidden, 0.0, x / (1 - share) if rescale else x)
    output = np.asarray(model.apply({"params": params}, inputs)[0])
    np.testing.assert_allclose(float(value), ((output - x) ** 2)[hidden & measured].mean(), rtol=1e-5)
    assert_finite_nonzero_grad(loss, params, batch, key)


def test_gp_to_tf_sees_only_the_programme_and_scores_only_the_tf():
    loss, model, params, info = setup("gp_to_tf")
    raw, _ = raw_batch(3)
    batch, key = batch_for(raw), jax.random.key(6)
    view_key = jax.random.split(key)[0]
    inputs, shown, programme = (np.asarray(a) for a in one_programme_views(view_key, batch, info))
    x, measured = np.asarray(batch["x"]), np.asarray(batch["measured"])
    assert not (inputs[~PROGRAMMES[programme]]).any()  # nothing outside the programme
    np.testing.assert_array_equal(inputs[shown], x[shown])
    assert not shown[np.arange(N_CELLS), TFS[programme]].any()  # the TF is never shown

    value, _ = loss(params, batch, key)
    output = np.asarray(model.apply({"params": params}, inputs)[0])
    tf = TFS[programme]
    cells = measured[np.arange(N_CELLS), tf]
    expected = ((output[np.arange(N_CELLS), tf] - x[np.arange(N_CELLS), tf]) ** 2)[cells].mean()
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    assert_finite_nonzero_grad(loss, params, batch, key)

    outside = ~(PROGRAMMES.any(0) | np.isin(np.arange(N_GENES), TFS))  # neither input nor target
    batch2 = dict(batch, x=jnp.where(outside, batch["x"] + 1.0, batch["x"]))
    np.testing.assert_allclose(float(loss(params, batch2, key)[0]), float(value), rtol=1e-6)


def test_gp_to_gp_reconstructs_the_shown_programme():
    loss, model, params, info = setup("gp_to_gp")
    raw, _ = raw_batch(4)
    batch, key = batch_for(raw), jax.random.key(7)
    inputs, shown, _ = (np.asarray(a) for a in one_programme_views(jax.random.split(key)[0], batch, info))
    value, _ = loss(params, batch, key)
    x = np.asarray(batch["x"])
    output = np.asarray(model.apply({"params": params}, inputs)[0])
    np.testing.assert_allclose(float(value), ((output - x) ** 2)[shown].mean(), rtol=1e-5)
    assert_finite_nonzero_grad(loss, params, batch, key)


@pytest.mark.parametrize("name,loss_config", [
    ("masked", {}), ("masked", {"likelihood": "nb"}), ("gp_masked", {}), ("gp_to_tf", {}), ("gp_to_gp", {}),
    ("byol", {"projector": (8, 6), "predictor": (8, 6)}), ("barlow_twins", {"projector": (8, 6)}),
    ("supervised", {})])
def test_unmeasured_genes_never_change_the_loss(name, loss_config):
    loss, _, params, _ = setup(name, **loss_config)
    raw, counts = raw_batch(5)
    perturbed = counts.copy()
    unmeasured = ~MEASURED[raw["dataset"]]
    perturbed[unmeasured] += np.random.default_rng(1).integers(1, 50, unmeasured.sum())
    raw2, _ = raw_batch(5, perturbed)
    key = jax.random.key(8)
    a, b = loss(params, batch_for(raw), key)[0], loss(params, batch_for(raw2), key)[0]
    assert np.isfinite(float(a))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and inside the loss: unmeasured entries of x and counts are ignored even when nonzero
    batch = batch_for(raw)
    noisy = dict(batch, x=jnp.where(batch["measured"], batch["x"], 7.0),
                 counts=jnp.where(batch["measured"], batch["counts"], 9.0))
    np.testing.assert_allclose(float(loss(params, noisy, key)[0]), float(a), rtol=1e-6)
