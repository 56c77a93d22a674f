"""The reference training loop: data -> jit step -> metrics, validation, checkpoints, resume."""
from __future__ import annotations

import math
import sys
import time

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from sscell.data.loader import CellLoader
from sscell.data.store import Store
from sscell.errors import SscellError
from sscell.losses import get_loss
from sscell.models.mlp import build_model
from sscell.training import checkpoint
from sscell.training.mesh import batch_sharded, data_mesh, global_batch, replicated
from sscell.training.metric_writer import MetricWriter
from sscell.training.optimizer import make_optimizer
from sscell.training.state import abstract_state, create_state
from sscell.training.step import make_eval_step, make_train_step


def make_loader(config: ml_collections.ConfigDict, store: Store, split: str) -> CellLoader:
    """The run's loader over one split, this process's share of each global batch."""
    return CellLoader(store, split, config.train.batch_size, config.seed,
                      block_cells=config.data.block_cells, prefetch=config.data.prefetch,
                      process_index=jax.process_index(), process_count=jax.process_count())


def build(config: ml_collections.ConfigDict, store: Store):
    """(model, optimizer, steps_per_epoch) of a run: what both training and evaluation rebuild."""
    model = build_model(config.model, store.n_genes)
    steps_per_epoch = make_loader(config, store, "train").steps_per_epoch
    return model, make_optimizer(config.train, steps_per_epoch), steps_per_epoch


def validation_loss(eval_step, params, loader: CellLoader, n_batches: int, key: jax.Array,
                    sharding) -> dict[str, float]:
    """Mean metrics over the first `n_batches` batches of the validation split (a fixed set)."""
    n_batches = min(n_batches, loader.steps_per_epoch)
    totals = [eval_step(params, global_batch(loader.batch(i), sharding), jax.random.fold_in(key, i))
              for i in range(n_batches)]
    return {f"val/{k}": float(np.mean([t[k] for t in totals])) for k in totals[0]}


def _check_finite(metrics: dict[str, float], step: int, last_checkpoint: int | None) -> None:
    for name, value in metrics.items():
        if not math.isfinite(value):
            raise SscellError(f"{name} is {value} at step {step}; the last good checkpoint is step "
                              f"{last_checkpoint}; lower train.lr or check the input data")


def train(config: ml_collections.ConfigDict, workdir: str, store: Store) -> dict:
    """Train (or resume training) until `config.train.steps`; returns the final train state.

    Checkpoints, metrics.jsonl and TensorBoard events go to `workdir`.
    """
    loss_fn = get_loss(config.loss.name)
    model, optimizer, steps_per_epoch = build(config, store)
    mesh = data_mesh()
    if config.train.batch_size % jax.device_count():
        raise SscellError(f"train.batch_size {config.train.batch_size} is not divisible by the "
                          f"{jax.device_count()} devices; choose a multiple")
    state_sharding, batch_sharding = replicated(mesh), batch_sharded(mesh)
    init_key, step_key, val_key = jax.random.split(jax.random.key(config.seed), 3)

    manager = checkpoint.checkpoint_manager(workdir, config.train.checkpoint_every,
                                            config.train.keep_checkpoints)
    restored = checkpoint.restore_latest(manager, abstract_state(model, optimizer, state_sharding))
    state = restored[0] if restored else create_state(model, optimizer, init_key, state_sharding)
    start, total = int(state["step"]), config.train.steps
    if start >= total:
        print(f"training already complete at step {start} (train.steps={total})")
        manager.close()
        return state

    loader, val_loader = make_loader(config, store, "train"), make_loader(config, store, "val")
    train_step = make_train_step(model, loss_fn, config.loss, optimizer, store.n_genes,
                                 state_sharding, batch_sharding)
    eval_step = make_eval_step(model, loss_fn, config.loss, store.n_genes)
    writer = MetricWriter(workdir, resume_step=start)
    primary = jax.process_index() == 0
    if primary:
        print(f"{'resuming at' if start else 'starting'} step {start} of {total}: {loader.n_cells} train cells, "
              f"{steps_per_epoch} steps per epoch, batch {config.train.batch_size}, {jax.device_count()} device(s)")

    window, window_start = [], time.perf_counter()
    progress = tqdm(total=total, initial=start, desc="train", unit="step", disable=not primary,
                    mininterval=1.0 if sys.stderr.isatty() else 30.0)  # logs get a line every 30 s
    for step, local_batch in enumerate(loader.iterate(start, total), start=start + 1):
        state, metrics = train_step(state, global_batch(local_batch, batch_sharding), step_key)
        window.append(metrics)
        progress.update()
        boundary = step % config.train.log_every == 0 or step == total
        if boundary or manager.should_save(step):
            record = {f"train/{k}": float(np.mean([jax.device_get(m[k]) for m in window])) for k in window[0]}
            elapsed = time.perf_counter() - window_start
            record["train/cells_per_s"] = len(window) * config.train.batch_size / elapsed
            record["train/epoch"] = step / steps_per_epoch
            if step % config.train.val_every == 0 or step == total:
                record.update(validation_loss(eval_step, state["params"], val_loader,
                                              config.train.val_batches, val_key, batch_sharding))
            _check_finite(record, step, manager.latest_step())
            writer.write(step, record)
            progress.set_postfix(loss=f"{record['train/loss']:.4f}",
                                 cells_s=f"{record['train/cells_per_s']:.0f}")
            window, window_start = [], time.perf_counter()
        checkpoint.save(manager, step, state, {"step": step, "epoch": step // steps_per_epoch},
                        force=step == total)
    progress.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()
    return state
