"""LARS as the Barlow Twins recipe has it, against a numpy reference of one update."""
import jax.numpy as jnp
import numpy as np
import pytest

from sscell.config import default_config
from sscell.training.optimizer import make_optimizer


def lars_config(**train):
    config = default_config().train
    config.update(optimizer="lars", lr=0.2, weight_decay=0.1, grad_clip=1e9, batch_size=1024, **train)
    return config


def one_update(config):
    rng = np.random.default_rng(0)
    params = {"dense_0": {"kernel": rng.normal(size=(6, 4)), "bias": rng.normal(size=4)},
              "norm_0": {"scale": 1 + rng.normal(size=4)}}
    grads = {k: {n: rng.normal(size=v.shape) for n, v in layer.items()} for k, layer in params.items()}
    params32 = {k: {n: jnp.asarray(v, jnp.float32) for n, v in layer.items()} for k, layer in params.items()}
    grads32 = {k: {n: jnp.asarray(v, jnp.float32) for n, v in layer.items()} for k, layer in grads.items()}
    optimizer = make_optimizer(config, steps_per_epoch=100)
    updates, _ = optimizer.update(grads32, optimizer.init(params32), params32)
    return params, grads, updates


def expected_update(w, g, lr, weight_decay, adapt):
    """One LARS step from zero momentum: (g + wd w) scaled by the trust ratio 0.001 |w| / |g + wd w|."""
    if not adapt:
        return -lr * g
    g = g + weight_decay * w
    return -lr * 0.001 * np.linalg.norm(w) / np.linalg.norm(g) * g


@pytest.mark.parametrize("exclude", [True, False])
def test_lars_excludes_biases_and_norms_and_scales_lr_with_the_batch(exclude):
    config = lars_config(lr_reference_batch=256, lars_exclude_bias_and_norm=exclude)
    params, grads, updates = one_update(config)
    lr = 0.2 * 1024 / 256
    for layer, names in params.items():
        for name, w in names.items():
            adapt = w.ndim > 1 or not exclude  # matrices always; biases and scales only when not excluded
            np.testing.assert_allclose(np.asarray(updates[layer][name]),
                                       expected_update(w, grads[layer][name], lr, 0.1, adapt), rtol=1e-5)


def test_warmup_cosine_schedule_reaches_lars_through_the_batch_scaling():
    config = lars_config(lr_reference_batch=512, schedule="warmup_cosine", warmup_steps=10, steps=100)
    rng = np.random.default_rng(1)
    params = {"bias": jnp.asarray(rng.normal(size=3), jnp.float32)}
    grads = {"bias": jnp.ones(3, jnp.float32)}
    optimizer = make_optimizer(config, steps_per_epoch=100)
    state = optimizer.init(params)
    seen = []
    for _ in range(12):
        updates, state = optimizer.update(grads, state, params)
        seen.append(-float(updates["bias"][0]))
    lr = 0.2 * 1024 / 512
    # momentum 0.9 on a constant gradient: update_t = sum_{s <= t} 0.9^(t-s) lr_s, lr_s = lr * s / 10 in warm-up
    rates = [lr * s / 10 for s in range(11)]
    expected = [sum(0.9 ** (t - s) * rates[s] for s in range(t + 1)) for t in range(11)]
    np.testing.assert_allclose(seen[:11], expected, rtol=1e-5)
