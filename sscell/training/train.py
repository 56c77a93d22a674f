"""The reference training loop: data -> jit step -> metrics, validation, checkpoints, resume."""
from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from sscell.allocator import retain_freed_memory
from sscell.data.loader import CellLoader, select_rows
from sscell.data.store import Store
from sscell.data.task_data import TaskInfo
from sscell.errors import Interrupted, SscellError
from sscell.losses.registry import Task
from sscell.models.precision import resolve_dtype
from sscell.training import checkpoint
from sscell.training.device_resident import resident_data, train_batches
from sscell.training.mesh import batch_sharded, global_batch, local_data_shards, make_mesh, state_shardings
from sscell.training.metric_writer import TRAIN_SECONDS, MetricWriter
from sscell.training.optimizer import learning_rate, make_optimizer, make_schedule, schedule_warning
from sscell.training.state import abstract_state, check_init_from, create_state, pretrained_encoder
from sscell.training.step import make_eval_step, make_train_step
from sscell.training.task_setup import setup_task


def make_loader(config: ml_collections.ConfigDict, store: Store, split: str, shards: int = 1) -> CellLoader:
    """The run's loader over one split, this process's share of each global batch laid out in
    `shards` data shards (`mesh.local_data_shards` of the run's mesh). The train split is
    narrowed to `data.train_datasets` and `data.train_fraction`; the other splits to those of
    `data.train_datasets` that have cells in them (all cells if none has), so validation, and
    the best checkpoint, follow the data trained on. A validation split smaller than
    `train.batch_size` is read in batches of its cells (rounded down to a multiple of the shards)."""
    datasets, batch_size = tuple(config.data.train_datasets), config.train.batch_size
    if split == "train":
        subset = dict(datasets=datasets, fraction=config.data.train_fraction)
    else:
        start, stop = store.split_range(split)
        present = set(store.labels["dataset_id"].iloc[start:stop].astype(str)) if datasets else set()
        subset = dict(datasets=tuple(d for d in datasets if d in present))
        n_cells, unit = len(select_rows(store, split, **subset)), shards * jax.process_count()
        batch_size = min(batch_size, n_cells // unit * unit) or batch_size  # fewer than unit: the loader refuses
    return CellLoader(store, split, batch_size, config.seed, **subset,
                      block_cells=config.data.block_cells, prefetch=config.data.prefetch, shards=shards,
                      process_index=jax.process_index(), process_count=jax.process_count(),
                      modality=config.data.get("modality", ""))


class Setup(NamedTuple):
    """What training, evaluation and benchmarks rebuild from a config and a store."""

    task: Task
    info: TaskInfo
    model: nn.Module
    optimizer: optax.GradientTransformation
    steps_per_epoch: int
    init_extra: Callable  # params -> the task's non-gradient state


def build(config: ml_collections.ConfigDict, store: Store) -> Setup:
    """The task, model and optimiser a config describes, on this store."""
    task, info = setup_task(config, store)
    steps_per_epoch = make_loader(config, store, "train").steps_per_epoch
    return Setup(task, info, task.build_model(config, info), make_optimizer(config.train, steps_per_epoch),
                 steps_per_epoch, functools.partial(task.init_extra, config=config))


def validation_loss(eval_step, state, loader: CellLoader, n_batches: int, key: jax.Array,
                    sharding) -> dict[str, float]:
    """Mean metrics over the first `n_batches` batches of the validation split (a fixed set)."""
    n_batches = min(n_batches, loader.steps_per_epoch)
    totals = [eval_step(state, global_batch(loader.batch(i), sharding), jax.random.fold_in(key, i))
              for i in range(n_batches)]
    return {f"val/{k}": float(np.mean([t[k] for t in totals])) for k in totals[0]}


def _nonfinite_error(name: str, value, step: int, last_checkpoint: int | None) -> SscellError:
    return SscellError(f"{name} is {float(value)} at step {step}; stopped, the last good checkpoint is step "
                       f"{last_checkpoint}; lower train.lr, check the input data or set train.skip_nonfinite")


def summarise_window(window: list[dict], last_step: int, skip_nonfinite: int, consecutive: int,
                     last_checkpoint: int | None) -> tuple[dict[str, float], int]:
    """(mean train metrics of the window's finite steps, non-finite steps in a row at its end).

    `window` holds the host metrics of the steps up to `last_step`. A step with a non-finite
    metric (loss, grad_norm, ...) stops the run, or, with `skip_nonfinite` = N, is left out
    (the optimiser skipped it) unless it is the (N+1)th in a row.
    """
    first, finite = last_step - len(window) + 1, []
    for offset, metrics in enumerate(window):
        ranked = sorted(metrics.items(), key=lambda item: item[0] != "loss")  # name the loss if it is bad
        bad = next(((k, v) for k, v in ranked if not np.all(np.isfinite(v))), None)
        consecutive = consecutive + 1 if bad else 0
        if bad and consecutive > skip_nonfinite:
            raise _nonfinite_error(f"train/{bad[0]}", bad[1], first + offset, last_checkpoint)
        if not bad:
            finite.append(metrics)
    record = {f"train/{k}": float(np.mean([m[k] for m in finite])) for k in finite[0]} if finite else {}
    if skip_nonfinite:
        record["train/skipped_steps"] = len(window) - len(finite)
    return record, consecutive


class Preemption:
    """Whether to save and stop now: SIGTERM or Ctrl-C (SIGINT) in a one-process run, or, across
    processes, the step all of them agreed on after one was told of a preemption (orbax / JAX's
    sync point). After a first Ctrl-C, a second one stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, manager):
        self.manager, self.signalled, self.interrupted = manager, False, False
        self.handles_signal = jax.process_count() == 1 and threading.current_thread() is threading.main_thread()
        if self.handles_signal:
            self.previous = {signum: signal.signal(signum, self._on_signal) for signum in self.SIGNALS}

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True  # the loop finishes the step, saves and returns
        if signum == signal.SIGINT:
            self.interrupted = True
            signal.signal(signal.SIGINT, self.previous[signal.SIGINT])

    def reached(self, step: int) -> bool:
        return self.signalled or (jax.process_count() > 1 and self.manager.reached_preemption(step))

    def close(self) -> None:
        if self.handles_signal:
            for signum, handler in self.previous.items():
                signal.signal(signum, handler)


def sharded_state_layout(config: ml_collections.ConfigDict, setup: Setup, mesh) -> tuple[dict, dict]:
    """(abstract train state with shardings, the shardings) on `mesh` under `config.mesh.rules`."""
    model, optimizer, init_extra = setup.model, setup.optimizer, setup.init_extra
    shardings = state_shardings(abstract_state(model, optimizer, None, init_extra), mesh, config.mesh.rules)
    return abstract_state(model, optimizer, shardings, init_extra), shardings


def _check_batch_fits_mesh(config: ml_collections.ConfigDict, mesh) -> None:
    if config.train.batch_size % mesh.shape["data"]:
        raise SscellError(f"train.batch_size {config.train.batch_size} is not divisible by the mesh's "
                          f"{mesh.shape['data']} data shards; choose a multiple")


def check_settings(config: ml_collections.ConfigDict) -> None:
    """The checks of a run's settings that need no data: the compute dtype, the schedule and the optimiser."""
    resolve_dtype(config.model.dtype)
    make_optimizer(config.train, steps_per_epoch=1)


def check_run(config: ml_collections.ConfigDict, store: Store, devices=None) -> None:
    """Every check of a run's settings against its store and devices that `train` would fail,
    without training or writing anything: the task, the model and its sharding rules, the batch
    against the mesh and the train and validation cells, the schedule and optimiser, and the
    run that `train.init_from` names. Run it before anything is written into the workdir."""
    config = config.copy_and_resolve_references()
    config.model.dtype = resolve_dtype(config.model.dtype)
    setup = build(config, store)
    mesh = make_mesh(config.mesh, devices)
    _check_batch_fits_mesh(config, mesh)
    loader, _ = (make_loader(config, store, split, local_data_shards(mesh)) for split in ("train", "val"))
    resident_data(loader, mesh, config.data.device_resident, config.data.device_memory_share)
    sharded_state_layout(config, setup, mesh)
    if config.train.init_from:
        check_init_from(config.train.init_from, config.train.init_checkpoint, store)


class TrainResult(NamedTuple):
    """What `train` returns: the final train state, and whether it reached `train.steps`."""

    state: dict
    finished: bool  # False after a preemption (SIGTERM): rerunning resumes


def train(config: ml_collections.ConfigDict, workdir: str, store: Store, devices=None) -> TrainResult:
    """Train (or resume training) until `config.train.steps`; returns the final train state and
    whether training finished.

    Runs on a `config.mesh` mesh over `devices` (default: all). Checkpoints, metrics.jsonl and
    TensorBoard events go to `workdir`. On SIGTERM / preemption it finishes the step, saves and
    returns early (not finished, the state's step below `train.steps`); on Ctrl-C it does the same,
    then raises `Interrupted`. Rerunning resumes. Every metrics record holds the run's training wall
    time so far (`train/wall_s`, from this call's start, plus the earlier sessions' of a resumed run).
    Freed host memory stays in the process from then on (`sscell.allocator`).
    """
    started = time.perf_counter()
    retain_freed_memory()
    setup = build(config, store)
    task, info, model, optimizer, steps_per_epoch, init_extra = setup
    mesh = make_mesh(config.mesh, devices)
    _check_batch_fits_mesh(config, mesh)
    abstract, state_sharding = sharded_state_layout(config, setup, mesh)
    batch_sharding = batch_sharded(mesh)
    init_key, step_key, val_key = jax.random.split(jax.random.key(config.seed), 3)

    manager = checkpoint.checkpoint_manager(workdir, config.train.checkpoint_every,
                                            config.train.keep_checkpoints)
    restored = checkpoint.restore(manager, abstract)  # the run's own checkpoint wins over train.init_from
    if restored:
        state = restored[0]
    else:
        encoder = (pretrained_encoder(config.train.init_from, config.train.init_checkpoint, store, abstract["params"])
                   if config.train.init_from else None)
        state = create_state(model, optimizer, init_key, state_sharding, init_extra, encoder)
    start, total = int(state["step"]), config.train.steps
    if start >= total:
        print(f"training already complete at step {start} (train.steps={total})")
        manager.close()
        return TrainResult(state, finished=True)

    loader, val_loader = (make_loader(config, store, split, local_data_shards(mesh)) for split in ("train", "val"))
    source, batches = train_batches(loader, mesh, config.data.device_resident, config.data.device_memory_share)
    train_step = make_train_step(task, model, config, optimizer, info, state_sharding, batch_sharding)
    eval_step = make_eval_step(task, model, config, info)
    writer = MetricWriter(workdir, resume_step=start)
    primary = jax.process_index() == 0
    if primary:
        print(f"{'resuming at' if start else 'starting'} step {start} of {total}: {loader.n_cells} train cells, "
              f"{steps_per_epoch} steps per epoch, batch {config.train.batch_size}, {jax.device_count()} "
              f"device(s), mesh {dict(mesh.shape)}, {source} data")
        warning = schedule_warning(config.train, steps_per_epoch)
        if warning:
            print(warning, file=sys.stderr)
    schedule = make_schedule(config.train, steps_per_epoch)
    config_record = json.loads(config.to_json_best_effort())
    profile = tuple(config.train.profile_steps)
    preemption, tracing, consecutive_nonfinite = Preemption(manager), False, 0

    window, window_start = [], time.perf_counter()
    progress = tqdm(total=total, initial=start, desc="train", unit="step", disable=not primary,
                    mininterval=1.0 if sys.stderr.isatty() else 30.0)  # logs get a line every 30 s
    try:
        for step, batch in enumerate(batches(start, total), start=start + 1):
            if profile and step == profile[0]:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
                tracing = True
            state, metrics = train_step(state, batch, step_key)
            window.append(metrics)
            progress.update()
            if tracing and step == profile[1] - 1:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                tracing = False
            preempted = preemption.reached(step)
            save = manager.should_save(step) or step == total or preempted
            if not (save or step % config.train.log_every == 0):
                continue
            # Every saved step is checked first: no non-finite state is ever written.
            record, consecutive_nonfinite = summarise_window(
                jax.device_get(window), step, config.train.skip_nonfinite, consecutive_nonfinite,
                manager.latest_step())
            record["train/cells_per_s"] = len(window) * config.train.batch_size / (time.perf_counter() - window_start)
            record["train/epoch"] = step / steps_per_epoch
            record["train/lr"] = learning_rate(schedule, config.train, step)
            if step % config.train.val_every == 0 or step == total:
                record.update(validation_loss(eval_step, state, val_loader,
                                              config.train.val_batches, val_key, batch_sharding))
                bad = next((k for k, v in record.items() if k.startswith("val/") and not math.isfinite(v)), None)
                if bad:
                    raise _nonfinite_error(bad, record[bad], step, manager.latest_step())
            record[TRAIN_SECONDS] = writer.earlier_seconds + time.perf_counter() - started
            writer.write(step, record)
            progress.set_postfix(loss=f"{record.get('train/loss', math.nan):.4f}", lr=f"{record['train/lr']:.2e}",
                                 cells_s=f"{record['train/cells_per_s']:.0f}", refresh=False)
            window, window_start = [], time.perf_counter()
            if save:
                checkpoint.save(manager, step, state, {"step": step, "epoch": step // steps_per_epoch},
                                config_record, metrics=record, force=True)
            if preempted:  # and so saved; a signal after `reached` stops the run at the next step
                if primary and step < total and not preemption.interrupted:
                    print(f"preempted at step {step}: checkpoint saved; rerun the same command to resume")
                break
    finally:
        if tracing:
            jax.profiler.stop_trace()
        progress.close()
        manager.wait_until_finished()  # also on errors: the last good checkpoint is complete on disk
        manager.close()
        preemption.close()  # after the last save: a Ctrl-C during it is recorded, announced below
        writer.close()
    if preemption.interrupted:
        raise Interrupted(f"training stopped at step {step}, checkpoint saved; rerun the same command to resume")
    return TrainResult(state, finished=int(state["step"]) >= total)
