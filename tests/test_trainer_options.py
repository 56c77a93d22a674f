"""Trainer options in one process: NaN guard (stop / skip), best checkpoint, schedules,
gradient accumulation, profiler window."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from sscell.config import default_config
from sscell.errors import SscellError
from sscell.losses import get_loss
from sscell.losses.registry import register
from sscell.training import checkpoint
from sscell.training.mesh import make_mesh, replicated
from sscell.training.optimizer import clip_by_global_norm, make_optimizer, make_schedule, schedule_warning
from sscell.training.state import abstract_state
from sscell.training.train import build, make_loader, summarise_window, train

POISONED_STEP = 13


@register("masked_poisoned")
def poisoned_loss(params, batch, key, **kwargs):
    """The masked loss, made non-finite (loss and gradients) on batches holding `config.poison_cell`."""
    loss, metrics = get_loss("masked")(params, batch, key, **kwargs)
    factor = jnp.where(jnp.any(batch["cell"] == kwargs["config"].poison_cell), jnp.nan, 1.0)
    return loss * factor, {**metrics, "loss": loss * factor}


@pytest.fixture
def poisoned_config(tiny_config, tiny_store):
    """Training whose step POISONED_STEP (only) has a NaN loss and NaN gradients."""
    tiny_config.train.update(steps=16, checkpoint_every=5, val_every=5)
    cells = make_loader(tiny_config, tiny_store, "train").batch(POISONED_STEP - 1)["cell"]
    tiny_config.loss.name = "masked_poisoned"
    tiny_config.loss.poison_cell = int(cells[0])
    return tiny_config


def read_metrics(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def restore(workdir, config, store, which="latest", step=None):
    """(state, steps on disk, best step) of `workdir`'s checkpoint `which`, or of `step`."""
    model, optimizer = build(config, store)[2:4]
    manager = checkpoint.checkpoint_manager(workdir, config.train.checkpoint_every, config.train.keep_checkpoints)
    layout = abstract_state(model, optimizer, replicated(make_mesh(config.mesh)))
    if step is None:
        state, _ = checkpoint.restore(manager, layout, which)
    else:
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(layout)))["state"]
    steps, best = manager.all_steps(), manager.best_step()
    manager.close()
    return state, steps, best


def all_finite(tree):
    return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree) if np.issubdtype(x.dtype, np.floating))


def test_nonfinite_step_stops_the_run_and_keeps_the_last_good_checkpoint(poisoned_config, tiny_store, tmp_path):
    with pytest.raises(SscellError, match=f"train/loss is nan at step {POISONED_STEP};.*checkpoint is step 10"):
        train(poisoned_config, str(tmp_path), tiny_store)
    state, steps, _ = restore(tmp_path, poisoned_config, tiny_store)
    assert steps == [5, 10] and int(state["step"]) == 10 and all_finite(state)
    assert [r["step"] for r in read_metrics(tmp_path)] == [5, 10]


@pytest.mark.slow
def test_skip_nonfinite_leaves_the_state_unchanged_and_continues(poisoned_config, tiny_store, tmp_path):
    poisoned_config.train.update(skip_nonfinite=2, checkpoint_every=1, keep_checkpoints=20)
    final = train(poisoned_config, str(tmp_path), tiny_store).state
    assert int(final["step"]) == 16 and all_finite(final)
    before, _, _ = restore(tmp_path, poisoned_config, tiny_store, step=POISONED_STEP - 1)
    after, _, _ = restore(tmp_path, poisoned_config, tiny_store, step=POISONED_STEP)
    for x, y in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(after["params"]), strict=True):
        np.testing.assert_array_equal(x, y)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if r["train/skipped_steps"]] == [POISONED_STEP]
    assert all(math.isfinite(r["train/loss"]) for r in records if r["step"] != POISONED_STEP)


def test_skipping_stops_after_too_many_nonfinite_steps_in_a_row():
    window = [{"loss": np.float32(1.0)}, {"loss": np.float32(np.nan)}, {"loss": np.float32(np.inf)}]
    record, in_a_row = summarise_window(window, last_step=30, skip_nonfinite=2, consecutive=0, last_checkpoint=25)
    assert record == {"train/loss": 1.0, "train/skipped_steps": 2} and in_a_row == 2
    with pytest.raises(SscellError, match="train/loss is nan at step 31;.*checkpoint is step 30"):
        summarise_window([{"loss": np.float32(np.nan)}], 31, 2, in_a_row, last_checkpoint=30)


def test_best_checkpoint_is_kept_and_restorable(tiny_config, tiny_store, tmp_path):
    tiny_config.train.update(steps=30, lr=0.03, val_every=5, checkpoint_every=5, keep_checkpoints=1,
                             profile_steps=(3, 5))
    train(tiny_config, str(tmp_path), tiny_store)
    val = {r["step"]: r["val/loss"] for r in read_metrics(tmp_path) if "val/loss" in r}
    best_step = min(val, key=val.get)
    latest, steps, best = restore(tmp_path, tiny_config, tiny_store, "latest")
    best_state, _, _ = restore(tmp_path, tiny_config, tiny_store, "best")
    assert best == best_step and steps == sorted({best_step, 30})
    assert int(latest["step"]) == 30 and int(best_state["step"]) == best_step
    assert list((tmp_path / "profile").rglob("*.xplane.pb"))  # the profiler window's trace


def train_config(**overrides):
    config = default_config().train
    config.update(lr=0.1, lr_decay=0.5, lr_decay_epochs=2, weight_decay=0.0, grad_clip=1e9, steps=100,
                  warmup_steps=10, **overrides)
    return config


def test_schedules_follow_their_formulas():
    steps = np.arange(0, 100)
    decay = make_schedule(train_config(grad_accum=2), steps_per_epoch=10)  # 5 updates per epoch
    np.testing.assert_allclose([decay(s) for s in steps], 0.1 * 0.5 ** (steps // 10), rtol=1e-6)
    cosine = make_schedule(train_config(schedule="warmup_cosine"), steps_per_epoch=10)
    expected = np.where(steps < 10, 0.1 * steps / 10, 0.05 * (1 + np.cos(np.pi * (steps - 10) / 90)))
    np.testing.assert_allclose([cosine(s) for s in steps], expected, rtol=1e-5, atol=1e-8)
    with pytest.raises(SscellError, match="unknown train.schedule"):
        make_schedule(train_config(schedule="linear"), 10)


@pytest.mark.parametrize("steps_per_epoch", [1, 10, 10_000])  # a 64-cell dataset to millions of cells
def test_lr_decay_steps_decays_every_that_many_steps_whatever_the_dataset_size(steps_per_epoch):
    steps = np.arange(0, 100)
    decay = make_schedule(train_config(lr_decay_steps=30), steps_per_epoch)
    np.testing.assert_allclose([decay(s) for s in steps], 0.1 * 0.5 ** (steps // 30), rtol=1e-6)
    accumulated = make_schedule(train_config(lr_decay_steps=30, grad_accum=3), steps_per_epoch)  # 10 updates
    np.testing.assert_allclose([accumulated(u) for u in steps], 0.1 * 0.5 ** (steps // 10), rtol=1e-6)


def test_a_schedule_that_ends_learning_early_is_warned_about():
    # x0.5 every 2 epochs of 2 steps: step 33 of 100 runs after 32 updates, 8 halvings
    message = schedule_warning(train_config(), steps_per_epoch=2)
    assert message == (f"warning: the learning rate falls to {0.5 ** 8:.1%} of train.lr by step 33 (a third of "
                       "train.steps=100); decay more slowly, e.g. --config.train.lr_decay_steps=12")
    assert schedule_warning(train_config(lr_decay_steps=12), steps_per_epoch=2) is None  # 0.5**2 at step 33
    assert schedule_warning(train_config(), steps_per_epoch=5) is None  # 0.5**3 at step 33: 12.5%
    assert schedule_warning(train_config(schedule="warmup_cosine"), steps_per_epoch=2) is None


@pytest.mark.slow
def test_the_learning_rate_is_logged_and_a_fast_decay_warned(tiny_config, tiny_store, tmp_path, capsys):
    tiny_config.train.update(lr=0.01, lr_decay=0.5, lr_decay_steps=4, steps=20, log_every=3)
    train(tiny_config, str(tmp_path), tiny_store)
    records = [r for r in read_metrics(tmp_path) if "train/lr" in r]
    assert [r["step"] for r in records] == [3, 6, 9, 10, 12, 15, 18, 20]
    for record in records:  # the rate of the record's last step: updates before it, halved every 4
        assert record["train/lr"] == pytest.approx(0.01 * 0.5 ** ((record["step"] - 1) // 4), rel=1e-6)
    assert "warning:" not in capsys.readouterr().err  # 50% of lr at step 6, a third of the run
    tiny_config.train.update(lr_decay_steps=1)
    train(tiny_config, str(tmp_path / "fast"), tiny_store)
    assert f"warning: the learning rate falls to {0.5 ** 5:.1%} of train.lr by step 6" in capsys.readouterr().err


@pytest.mark.parametrize("max_norm", [0.5, 100.0])  # clipped, untouched
def test_clip_by_global_norm_matches_optax_and_the_formula(max_norm):
    rng = np.random.default_rng(0)
    grads = {"a": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
             "b": jnp.asarray(rng.standard_normal(5), jnp.float32)}
    norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads.values()))
    ours, reference = clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    clipped, state = ours.update(grads, ours.init(grads))
    expected, reference_state = reference.update(grads, reference.init(grads))
    assert jax.tree.structure(state) == jax.tree.structure(reference_state)  # checkpoints stay compatible
    for name, g in grads.items():
        np.testing.assert_allclose(clipped[name], np.asarray(g) * min(1.0, max_norm / norm), rtol=1e-6)
        np.testing.assert_allclose(clipped[name], expected[name], rtol=1e-6)


def test_gradient_accumulation_applies_the_mean_of_its_micro_batches():
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    g1, g2 = {"w": jnp.array([0.5, 1.0, -1.0])}, {"w": jnp.array([1.5, -3.0, 2.0])}
    accumulating = make_optimizer(train_config(grad_accum=2), 10)
    state = accumulating.init(params)
    first, state = accumulating.update(g1, state, params)
    second, _ = accumulating.update(g2, state, params)
    plain = make_optimizer(train_config(), 10)
    expected, _ = plain.update(jax.tree.map(lambda a, b: (a + b) / 2, g1, g2), plain.init(params), params)
    np.testing.assert_array_equal(first["w"], 0.0)
    np.testing.assert_allclose(second["w"], expected["w"], rtol=1e-6)
