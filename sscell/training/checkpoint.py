"""Orbax checkpoints of a run: train state, data-iterator state and config, per step.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it),
so a run killed mid-save leaves the previous checkpoint as the latest complete one. The
manager keeps the last `keep` checkpoints plus the one with the lowest validation loss.
The run's randomness needs no saving: it is `fold_in(key(config.seed), step)`.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from sscell.errors import SscellError

BEST_METRIC = "val/loss"


def _best_metric(metrics: dict) -> float:
    return metrics[BEST_METRIC]


def _not_untracked_save_warning(record: logging.LogRecord) -> bool:
    """Drops orbax's warning for a save without metrics: sscell saves between validations on
    purpose (those checkpoints are kept as the latest, never as the best)."""
    return "Requested `tracked_metric`; did not provide metrics" not in record.getMessage()


def checkpoint_manager(workdir: str | os.PathLike, every: int, keep: int) -> ocp.CheckpointManager:
    """A manager over `workdir/checkpoints` saving every `every` steps; keeps the last `keep` and the best."""
    logging.getLogger("absl").addFilter(_not_untracked_save_warning)  # orbax logs through absl; added once
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.FixedIntervalPolicy(every),
        preservation_policy=policies.AnyPreservationPolicy([
            policies.LatestN(keep),
            policies.BestN(get_metric_fn=_best_metric, reverse=True, n=1, keep_checkpoints_without_metrics=False),
        ]),
        best_fn=_best_metric, best_mode="min",
    )
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def has_checkpoint(workdir: str | os.PathLike) -> bool:
    """Whether `workdir/checkpoints` holds a complete checkpoint (orbax names those by their
    step; one being written has a temporary name)."""
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def save(manager: ocp.CheckpointManager, step: int, state: dict, data_state: dict, config: dict,
         metrics: dict[str, float] | None = None, force: bool = False) -> bool:
    """Save (asynchronously) if the policy says so at `step`, or always with `force`.

    `metrics` holding "val/loss" make the checkpoint a candidate for the best one.
    """
    if metrics is not None and BEST_METRIC not in metrics:
        metrics = None
    return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      data=ocp.args.JsonSave(data_state),
                                                      config=ocp.args.JsonSave(config)),
                        metrics=metrics, force=force)


def best_or_latest_step(manager: ocp.CheckpointManager, which: str) -> int | None:
    """The step of the "latest" checkpoint, or of the "best" (lowest validation loss); None when
    there is no checkpoint. "best" refuses a run whose checkpoints have no validation loss yet (it
    stopped before its first validation): that is not silently the latest."""
    if which == "latest":
        return manager.latest_step()
    step = manager.best_step()
    if step is None and manager.latest_step() is not None:
        raise SscellError(f"{manager.directory.parent} has checkpoints (latest: step {manager.latest_step()}) but none "
                          "with a validation loss yet, so no best one; train on past the next validation "
                          "(train.val_every) or choose 'latest' (eval.checkpoint, train.init_checkpoint or --checkpoint)")
    return step


def restore(manager: ocp.CheckpointManager, abstract_state: dict,
            which: str = "latest") -> tuple[dict, dict] | None:
    """(state, data_state) of the "latest" or "best" checkpoint (`best_or_latest_step`) laid out
    as `abstract_state` (shardings included, so a checkpoint restores onto any mesh); None if
    there is none."""
    if which not in ("latest", "best"):
        raise SscellError(f"unknown checkpoint '{which}'; choose latest or best (config.eval.checkpoint)")
    step = best_or_latest_step(manager, which)
    if step is None:
        return None
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]


def saved_state(workdir: str | os.PathLike, train_config, which: str) -> tuple[Path, int] | None:
    """(directory of the saved train state, step) of `workdir`'s "latest" or "best" checkpoint
    (`train_config`: the run's config.train); None if it has none."""
    if which not in ("latest", "best"):
        raise SscellError(f"unknown checkpoint '{which}'; choose latest or best")
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):  # a reader creates nothing (the manager would)
        return None
    manager = checkpoint_manager(workdir, train_config.checkpoint_every, train_config.keep_checkpoints)
    try:
        step = best_or_latest_step(manager, which)
    finally:
        manager.close()
    return None if step is None else (Path(manager.directory) / str(step) / "state", step)


def params_metadata(path: str | os.PathLike) -> dict:
    """Shapes and dtypes (orbax metadata) of the parameters of the train state saved at `path`."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        return dict(handler.metadata(path))["params"]
    finally:
        handler.close()


def restore_params(path: str | os.PathLike, layout: dict) -> dict:
    """The parameters of the train state saved at `path` that `layout` names (`params_metadata`
    or a part of it, e.g. {"encoder": ...}), as numpy arrays; nothing else is read."""
    item = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), layout)}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    handler = ocp.PyTreeCheckpointHandler()
    try:
        return handler.restore(path, args=ocp.args.PyTreeRestore(item, restore_args, partial_restore=True))["params"]
    finally:
        handler.close()
