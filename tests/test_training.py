"""Training on the tiny store: the loss falls, checkpoints restore, resume is exact."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from sscell.config import default_config, save_config
from sscell.data.loader import select_rows
from sscell.errors import SscellError
from sscell.models import dtype_probe
from sscell.models.precision import resolve_dtype
from sscell.training import checkpoint
from sscell.training.mesh import make_mesh, replicated
from sscell.training.resume import check_compatible
from sscell.training.state import abstract_state
from sscell.training.train import build, check_run, train


def read_metrics(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_loss_decreases_and_metrics_are_logged(tiny_config, tiny_store, tmp_path):
    tiny_config.train.steps = 60
    train(tiny_config, str(tmp_path), tiny_store)
    records = read_metrics(tmp_path)
    losses = [r["train/loss"] for r in records]
    assert [r["step"] for r in records] == list(range(5, 61, 5))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:2])
    assert "val/loss" in records[-1] and np.isfinite(records[-1]["val/loss"])
    assert records[-1]["train/cells_per_s"] > 0
    assert list((tmp_path / "tensorboard").iterdir())


def test_checkpoint_restores_the_final_state(tiny_config, tiny_store, tmp_path):
    state = train(tiny_config, str(tmp_path), tiny_store).state
    model, optimizer = build(tiny_config, tiny_store)[2:4]
    manager = checkpoint.checkpoint_manager(tmp_path, 10, 3)
    assert manager.all_steps() == [10, 20, 30]
    layout = abstract_state(model, optimizer, replicated(make_mesh(tiny_config.mesh)))
    restored, data_state = checkpoint.restore(manager, layout)
    manager.close()
    assert data_state == {"step": 30, "epoch": 30 // (tiny_store.split_range("train")[1] // 64)}
    assert_trees_equal(restored, state)


def test_resume_continues_and_equals_an_uninterrupted_run(tiny_config, tiny_store, tmp_path):
    tiny_config.train.steps = 24
    straight = train(tiny_config, str(tmp_path / "straight"), tiny_store).state

    tiny_config.train.steps = 14  # stops (as if killed) after its step-14 checkpoint
    assert train(tiny_config, str(tmp_path / "resumed"), tiny_store).finished
    tiny_config.train.steps = 24
    resumed, finished = train(tiny_config, str(tmp_path / "resumed"), tiny_store)
    assert finished and train(tiny_config, str(tmp_path / "resumed"), tiny_store).finished  # found finished

    assert int(resumed["step"]) == 24
    assert_trees_equal(resumed["params"], straight["params"])
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed")]
    assert steps == sorted(set(steps)) and steps[-1] == 24


def test_resume_after_a_crash_drops_metrics_past_the_checkpoint(tiny_config, tiny_store, tmp_path):
    """...and the training wall time continues from the last kept record's."""
    train(tiny_config, str(tmp_path), tiny_store)
    records = read_metrics(tmp_path)
    seconds = [r["train/wall_s"] for r in records]
    assert 0 < seconds[0] and seconds == sorted(seconds)
    records[-1]["train/wall_s"] = 1e4  # step 30, the checkpoint: as if the first session had taken that long
    records.append({"step": 35, "train/loss": 1.0, "train/wall_s": 2e4})  # a run that logged step 35 and died
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tiny_config.train.steps = 40
    train(tiny_config, str(tmp_path), tiny_store)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(5, 41, 5))
    assert 1e4 < records[-2]["train/wall_s"] < records[-1]["train/wall_s"] < 2e4


@pytest.fixture(scope="module")
def checkpoints(tiny_store, tmp_path_factory):
    """The checkpoints folder of a 10-step run: what makes a workdir hold something learned."""
    config = default_config()
    config.data.store = tiny_store.path
    config.model.update(hidden=(16,), latent=4)
    config.train.update(steps=10, batch_size=64, checkpoint_every=10, val_every=10, val_batches=1)
    workdir = tmp_path_factory.mktemp("checkpointed")
    train(config, str(workdir), tiny_store)
    return workdir / "checkpoints"


def run_with_checkpoint(config, workdir, checkpoints):
    """`workdir` as left by a run of `config` that saved a checkpoint."""
    save_config(config, workdir)
    shutil.copytree(checkpoints, workdir / "checkpoints")


def test_incompatible_workdir_is_refused(tiny_config, tmp_path, checkpoints):
    run_with_checkpoint(tiny_config, tmp_path, checkpoints)
    tiny_config.train.steps += 100  # allowed: extends the run
    check_compatible(tiny_config, tmp_path)
    tiny_config.model.latent = 16
    with pytest.raises(SscellError, match="incompatible config.*model.latent"):
        check_compatible(tiny_config, tmp_path)


def test_a_workdir_without_a_checkpoint_takes_any_config(tiny_config, tmp_path, checkpoints):
    """A run that stopped before its first checkpoint learned nothing: its saved config is replaced."""
    save_config(tiny_config, tmp_path)
    (tmp_path / "checkpoints" / "10.orbax-checkpoint-tmp-1").mkdir(parents=True)  # a save cut short
    tiny_config.model.latent = 16
    tiny_config.train.batch_size = 32
    check_compatible(tiny_config, tmp_path)
    shutil.rmtree(tmp_path / "checkpoints")
    shutil.copytree(checkpoints, tmp_path / "checkpoints")
    with pytest.raises(SscellError, match="incompatible config.*train.batch_size: 64 -> 32"):
        check_compatible(tiny_config, tmp_path)


def test_a_store_converted_into_the_workdir_is_not_reused_for_other_data(tiny_config, tmp_path):
    tiny_config.data.store = ""
    tiny_config.data.synthetic.n_cells = 1600
    save_config(tiny_config, tmp_path)
    (tmp_path / "store").mkdir()  # converted from the saved config's data, no checkpoint yet
    tiny_config.train.batch_size = 32
    check_compatible(tiny_config, tmp_path)  # not what the store was made from
    tiny_config.data.synthetic.n_cells = 5000
    with pytest.raises(SscellError, match="store was converted from other data.*n_cells: 1600 -> 5000.*delete"):
        check_compatible(tiny_config, tmp_path)


def test_a_config_saved_before_lr_decay_steps_existed_still_resumes(tiny_config, tmp_path, checkpoints):
    run_with_checkpoint(tiny_config, tmp_path, checkpoints)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["train"]["lr_decay_steps"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    check_compatible(tiny_config, tmp_path)  # the missing field counts as its default, 0
    tiny_config.train.lr_decay_steps = 100
    with pytest.raises(SscellError, match="incompatible config.*lr_decay_steps: 0 -> 100"):
        check_compatible(tiny_config, tmp_path)


def test_a_cosine_schedule_cannot_be_stretched_on_resume(tiny_config, tmp_path, checkpoints):
    tiny_config.train.schedule = "warmup_cosine"
    run_with_checkpoint(tiny_config, tmp_path, checkpoints)
    tiny_config.train.steps += 100  # would change every remaining learning rate
    with pytest.raises(SscellError, match="incompatible config.*train.steps"):
        check_compatible(tiny_config, tmp_path)


@pytest.mark.parametrize("faster", ["float32", "bfloat16"])
def test_auto_dtype_is_the_measured_choice_and_a_resume_keeps_the_recorded_dtype(tiny_config, tmp_path, checkpoints,
                                                                                 monkeypatch, capsys, faster):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(dtype_probe, "cpu_has_bfloat16", lambda: True)
    monkeypatch.setattr(dtype_probe, "measure", lambda shapes: {faster: 1.0, other_dtype(faster): 2.0})
    tiny_config.model.dtype = "auto"
    check_compatible(tiny_config, tmp_path)  # a new run's "auto" waits for its store's genes
    assert tiny_config.model.dtype == "auto"
    check_compatible(tiny_config, tmp_path, n_genes=96)  # ... then is measured here
    assert tiny_config.model.dtype == faster
    assert f"model.dtype auto -> {faster} (measured: " in capsys.readouterr().out
    tiny_config.model.dtype = other_dtype(faster)
    run_with_checkpoint(tiny_config, tmp_path, checkpoints)  # a run trained (elsewhere) in the other dtype
    tiny_config.model.dtype = "auto"
    check_compatible(tiny_config, tmp_path, n_genes=96)  # settles "auto" as the saved run's dtype, not the probe's
    assert tiny_config.model.dtype == other_dtype(faster)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["model"]["dtype"] = "auto"  # a run saved before dtypes were settled trained in the hardware rule's
    (tmp_path / "config.json").write_text(json.dumps(saved))
    tiny_config.model.dtype = "auto"
    check_compatible(tiny_config, tmp_path, n_genes=96)
    assert tiny_config.model.dtype == resolve_dtype("auto")
    tiny_config.model.dtype = "bf16"
    with pytest.raises(SscellError, match="unknown model.dtype 'bf16'; choose one of auto, float32, bfloat16"):
        check_compatible(tiny_config, tmp_path / "new")  # before a run writes anything


def other_dtype(dtype: str) -> str:
    return {"float32": "bfloat16", "bfloat16": "float32"}[dtype]


def test_check_run_refuses_what_training_would_fail_on(tiny_config, tiny_store, tmp_path):
    check_run(tiny_config, tiny_store)
    tiny_config.train.batch_size = 4096
    n_train = len(select_rows(tiny_store, "train"))
    with pytest.raises(SscellError, match=f"split 'train' has {n_train} selected cells, fewer than one batch of 4096"):
        check_run(tiny_config, tiny_store)
    tiny_config.train.batch_size = 64
    tiny_config.train.init_from = str(tmp_path)
    with pytest.raises(SscellError, match="holds no sscell run"):
        check_run(tiny_config, tiny_store)
    assert os.listdir(tmp_path) == []  # nothing written
