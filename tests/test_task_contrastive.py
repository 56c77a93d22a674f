"""Contrastive tasks: augmentations, BYOL (symmetric loss, EMA target), Barlow Twins, and the
supervised baseline's class-weighted cross-entropy, against numpy references."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import scipy.stats
from sklearn.utils.class_weight import compute_class_weight

from sscell.config import default_config
from sscell.data.task_data import TaskInfo
from sscell.losses import get_task
from sscell.losses.augment import augment, nb_resample, two_views
from sscell.losses.barlow_twins import cross_correlation_loss
from sscell.losses.byol import ema_decay, update_target
from sscell.losses.supervised import balanced_weights
from sscell.models.mlp import init_params
from sscell.training.state import create_state
from sscell.training.step import make_train_step, task_batch

N_GENES = 16


def loss_batch(counts, measured_genes=None):
    """The loss's batch of dense `counts` (cells x N_GENES), built by the train step's own
    `task_batch` from the loader layout (one shard holding every gene of every cell)."""
    cells = counts.shape[0]
    measured = np.ones((1, N_GENES), bool) if measured_genes is None else measured_genes[None]
    loader_batch = {"genes": np.tile(np.arange(N_GENES, dtype=np.int32), (1, cells)),
                    "counts": counts.reshape(1, -1).astype(np.float32),
                    "indptr": np.arange(0, cells * N_GENES + 1, N_GENES, dtype=np.int32)[None],
                    "dataset": np.zeros(cells, np.int32)}
    return jax.jit(lambda b: task_batch(b, N_GENES, measured))(loader_batch)


def view(key, batch, **config):
    return np.asarray(jax.jit(lambda k, b: augment(k, b, ml_collections.ConfigDict(config)))(key, batch))


def test_augmentations_each_with_its_probability():
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, (400, N_GENES)).astype(np.float32)
    measured_genes = np.arange(N_GENES) > 0
    batch = loss_batch(counts, measured_genes)
    measured = np.broadcast_to(measured_genes, counts.shape)
    kept = np.where(measured, counts, 0.0)
    x = np.log1p(kept / kept.sum(1, keepdims=True) * 1e4)
    np.testing.assert_allclose(np.asarray(batch["x"]), x, rtol=1e-5)
    x = np.asarray(batch["x"])
    off = {"aug_nb_prob": 0.0, "aug_nb_theta": 10.0, "aug_dropout_prob": 0.0, "aug_dropout_rate": 0.5,
               "aug_gauss_prob": 0.0, "aug_gauss_std": 0.5}
    key = jax.random.key(0)
    np.testing.assert_array_equal(view(key, batch, **off), np.where(measured, x, 0.0))
    noisy = view(key, batch, **{**off, "aug_gauss_prob": 0.5})
    changed = (noisy != np.where(measured, x, 0.0)).any(1)
    assert abs(changed.mean() - 0.5) < 0.1 and noisy.min() >= 0.0 and not noisy[:, 0].any()
    dropped = view(key, batch, **{**off, "aug_dropout_prob": 1.0})
    zeroed = (dropped == 0) & (x > 0) & measured
    assert abs(zeroed.sum() / (measured & (x > 0)).sum() - 0.5) < 0.05

    resampled = view(key, batch, **{**off, "aug_nb_prob": 1.0, "aug_nb_theta": 10.0})
    assert not resampled[:, 0].any() and (resampled[counts == 0] == 0).all()
    assert 0.3 < (resampled != x).mean() < 1.0  # NB draws differ from the counts, and often tie with them



@pytest.mark.parametrize("mean,theta", [(0.7, 10.0), (3.0, 10.0), (7.5, 2.0), (40.0, 10.0), (600.0, 10.0)])
def test_nb_resample_follows_the_negative_binomial(mean, theta):
    n = 200_000
    ids = jnp.arange(n, dtype=jnp.uint32)
    sample = np.asarray(jax.jit(nb_resample, static_argnums=3)(jax.random.key(1), jnp.full(n, mean), ids, theta))
    assert (sample == np.round(sample)).all() and sample.min() >= 0
    variance = mean + mean**2 / theta
    assert abs(sample.mean() - mean) < 4 * np.sqrt(variance / n) + 0.005 * mean
    assert abs(sample.var() / variance - 1) < 0.03
    reference = scipy.stats.nbinom(theta, theta / (theta + mean))  # scipy's (n, p) parametrisation
    support = np.arange(int(reference.ppf(0.9999)) + 1)
    observed = np.searchsorted(np.sort(sample), support, side="right") / n
    assert np.abs(observed - reference.cdf(support)).max() < 0.01  # Kolmogorov distance (sampling: ~0.003)
    again = np.asarray(jax.jit(nb_resample, static_argnums=3)(jax.random.key(1), jnp.full(n, mean)[::-1], ids[::-1],
                                                              theta))
    np.testing.assert_array_equal(again[::-1], sample)  # a draw follows its id, not its position



def test_barlow_twins_loss_is_zero_for_identical_whitened_views():
    a = np.random.default_rng(0).normal(size=(64, 8))
    q, _ = np.linalg.qr(a - a.mean(0))  # columns: orthogonal, and mean 0 (they span centred columns)
    z = (q / q.std(0)).astype(np.float32)
    loss, c = cross_correlation_loss(jnp.asarray(z), jnp.asarray(z), 0.0051)
    np.testing.assert_allclose(np.asarray(c), np.eye(8), atol=1e-4)
    assert float(loss) < 1e-6


def test_barlow_twins_loss_matches_numpy():
    rng = np.random.default_rng(1)
    z1, z2 = rng.normal(size=(32, 6)).astype(np.float32), rng.normal(size=(32, 6)).astype(np.float32)
    loss, _ = cross_correlation_loss(jnp.asarray(z1), jnp.asarray(z2), 0.0051)
    n1, n2 = ((z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5) for z in (z1, z2))
    c = n1.T @ n2 / 32
    off = c - np.diag(np.diag(c))
    np.testing.assert_allclose(float(loss), ((1 - np.diag(c)) ** 2).sum() + 0.0051 * (off ** 2).sum(), rtol=1e-4)
    grad = jax.grad(lambda a: cross_correlation_loss(a, jnp.asarray(z2), 0.0051)[0])(jnp.asarray(z1))
    assert np.isfinite(grad).all() and float(jnp.abs(grad).sum()) > 0


def small_config(name):
    config = default_config()
    config.model.update(hidden=(16,), latent=4, dropout=0.0)
    config.loss.update(name=name, projector=(8, 6), predictor=(8, 6), ema_decay=0.9)
    return config


def test_ema_decay_schedules():
    config = small_config("byol").loss
    assert float(ema_decay(0, config)) == np.float32(0.9)
    config.update(ema_schedule="cosine", ema_steps=100)
    decays = [float(ema_decay(s, config)) for s in (0, 50, 100, 200)]
    np.testing.assert_allclose(decays, [0.9, 0.95, 1.0, 1.0], rtol=1e-6)


@pytest.mark.slow
def test_byol_step_moves_the_target_toward_the_online_network_by_the_ema_rule():
    config = small_config("byol")
    task = get_task("byol")
    info = TaskInfo(n_genes=N_GENES)
    model = task.build_model(config, info)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = create_state(model, optax.sgd(0.5), jax.random.key(0), sharding,
                         lambda p: task.init_extra(p, config))
    state["extra"]["target"] = jax.tree.map(lambda t: t + 0.1, state["extra"]["target"])  # target != online
    before = jax.tree.map(np.asarray, state)
    step = make_train_step(task, model, config, optax.sgd(0.5), info, sharding, sharding)
    rng = np.random.default_rng(0)
    genes = np.tile(np.arange(N_GENES, dtype=np.int32), (1, 32))  # every gene of 32 cells, in one shard
    batch = {"genes": genes, "counts": rng.poisson(3.0, genes.shape).astype(np.float32),
             "indptr": np.arange(0, 32 * N_GENES + 1, N_GENES, dtype=np.int32)[None],
             "dataset": np.zeros(32, np.int32), "cell_type": np.zeros(32, np.int32)}
    after, metrics = step(state, batch, jax.random.key(1))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    expected = jax.tree.map(lambda t, p: 0.9 * t + 0.1 * p, before["extra"]["target"], jax.tree.map(np.asarray, after["params"]))
    for got, want in zip(jax.tree.leaves(after["extra"]["target"]), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    moved = [np.abs(np.asarray(a) - b).sum() for a, b in zip(jax.tree.leaves(after["params"]), jax.tree.leaves(before["params"]))]
    assert sum(moved) > 0  # the online network learned, so the target follows something new
    assert jax.tree.structure(update_target(before["extra"], before["params"], 1, config)) == jax.tree.structure(before["extra"])


@pytest.mark.slow
def test_byol_loss_is_symmetric_two_minus_two_cos():
    config = small_config("byol")
    task = get_task("byol")
    info = TaskInfo(n_genes=N_GENES)
    model = task.build_model(config, info)
    params = init_params(model, jax.random.key(0))
    target = jax.tree.map(lambda p: p * 0.5, params)
    rng = np.random.default_rng(0)
    batch = loss_batch(rng.poisson(3.0, (24, N_GENES)))
    key = jax.random.key(2)
    loss, _ = jax.jit(lambda p, b, k, t: task.loss(p, b, k, model=model, config=config.loss, extra={"target": t},
                                                   info=info))(params, batch, key, target)
    keys = jax.random.split(key, 6)
    v1, v2 = (np.asarray(v) for v in jax.jit(lambda k, b: two_views(k, b, config.loss))(keys[0], batch))
    p1, p2 = (np.asarray(model.apply({"params": params}, v)[1]) for v in (v1, v2))
    t1, t2 = (np.asarray(model.apply({"params": target}, v)[0]) for v in (v1, v2))

    def two_minus_two_cos(a, b):
        return np.mean(2 - 2 * (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    np.testing.assert_allclose(float(loss), two_minus_two_cos(p1, t2) + two_minus_two_cos(p2, t1), rtol=1e-4)


def test_byol_target_runs_without_dropout_while_the_online_network_drops():
    config = small_config("byol")
    config.model.dropout = 0.3
    task = get_task("byol")
    info = TaskInfo(n_genes=N_GENES)
    model = task.build_model(config, info)
    params = init_params(model, jax.random.key(0))
    target = jax.tree.map(lambda p: p * 0.5, params)
    batch = loss_batch(np.random.default_rng(1).poisson(3.0, (24, N_GENES)))
    key = jax.random.key(3)
    loss, _ = jax.jit(lambda p, b, k, t: task.loss(p, b, k, model=model, config=config.loss, extra={"target": t},
                                                   info=info, train=True))(params, batch, key, target)
    keys = jax.random.split(key, 6)
    views = jax.jit(lambda k, b: two_views(k, b, config.loss))(keys[0], batch)
    online = [np.asarray(model.apply({"params": params}, v, train=True, rngs={"dropout": k})[1])
              for v, k in zip(views, (keys[2], keys[4]))]
    targets = [np.asarray(model.apply({"params": target}, v, train=False)[0]) for v in views]
    dropped = np.asarray(model.apply({"params": target}, views[1], train=True, rngs={"dropout": keys[3]})[0])
    assert not np.allclose(dropped, targets[1], rtol=1e-3)  # dropout does change the target's projection

    def two_minus_two_cos(a, b):
        return np.mean(2 - 2 * (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    expected = two_minus_two_cos(online[0], targets[1]) + two_minus_two_cos(online[1], targets[0])
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)


@pytest.mark.slow
def test_supervised_loss_is_balanced_cross_entropy():
    counts = np.array([30, 5, 0, 15])
    labels = np.repeat(np.arange(4), counts)
    np.testing.assert_allclose(balanced_weights(counts)[[0, 1, 3]],
                               compute_class_weight("balanced", classes=np.array([0, 1, 3]), y=labels), rtol=1e-6)
    assert balanced_weights(counts)[2] == 0

    config = small_config("supervised")
    task = get_task("supervised")
    info = TaskInfo(n_genes=N_GENES, n_cell_types=4, class_counts=counts)
    model = task.build_model(config, info)
    params = init_params(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    x = rng.random((10, N_GENES)).astype(np.float32)
    y = np.array([0, 1, 3, 0, 0, 1, 3, 3, 0, 1], np.int32)
    batch = {"x": x, "cell_type": y, "measured": np.ones_like(x, bool)}

    def loss_fn(p):
        return task.loss(p, batch, jax.random.key(1), model=model, config=config.loss, info=info)[0]
    logits = np.asarray(model.apply({"params": params}, x), np.float64)
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    w = balanced_weights(counts)[y]
    np.testing.assert_allclose(float(loss_fn(params)), -(w * log_p[np.arange(10), y]).sum() / w.sum(), rtol=1e-5)
    grads = jax.grad(loss_fn)(params)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads)) and sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)) > 0


@pytest.mark.slow
def test_byol_target_moves_only_when_accumulated_gradients_are_applied():
    config = small_config("byol")
    task = get_task("byol")
    info = TaskInfo(n_genes=N_GENES)
    model = task.build_model(config, info)
    optimizer = optax.MultiSteps(optax.sgd(0.5), every_k_schedule=2).gradient_transformation()
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = create_state(model, optimizer, jax.random.key(0), sharding, lambda p: task.init_extra(p, config))
    state["extra"]["target"] = jax.tree.map(lambda t: t + 0.1, state["extra"]["target"])
    step = make_train_step(task, model, config, optimizer, info, sharding, sharding)
    rng = np.random.default_rng(0)
    genes = np.tile(np.arange(N_GENES, dtype=np.int32), (1, 32))  # every gene of 32 cells, in one shard
    batch = {"genes": genes, "counts": rng.poisson(3.0, genes.shape).astype(np.float32),
             "indptr": np.arange(0, 32 * N_GENES + 1, N_GENES, dtype=np.int32)[None],
             "dataset": np.zeros(32, np.int32), "cell_type": np.zeros(32, np.int32)}
    start = jax.tree.map(np.asarray, state)
    micro, _ = step(state, batch, jax.random.key(1))  # first micro-batch: no parameter update
    micro = jax.tree.map(np.asarray, micro)
    for a, b in zip(jax.tree.leaves(micro["params"]) + jax.tree.leaves(micro["extra"]),
                    jax.tree.leaves(start["params"]) + jax.tree.leaves(start["extra"]), strict=True):
        np.testing.assert_array_equal(a, b)
    applied, _ = step(jax.tree.map(jnp.asarray, micro), batch, jax.random.key(1))
    expected = jax.tree.map(lambda t, p: 0.9 * t + 0.1 * np.asarray(p), micro["extra"]["target"], applied["params"])
    for got, want in zip(jax.tree.leaves(applied["extra"]["target"]), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
