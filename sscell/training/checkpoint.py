"""Orbax checkpoints of a run: the train state plus the data iterator's state.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it),
so a run killed mid-save leaves the previous checkpoint as the latest complete one.
"""
from __future__ import annotations

import os

import orbax.checkpoint as ocp


def checkpoint_manager(workdir: str | os.PathLike, every: int, keep: int) -> ocp.CheckpointManager:
    """A manager over `workdir/checkpoints` saving every `every` steps and keeping the last `keep`."""
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(every),
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
    )
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: dict, data_state: dict, force: bool = False) -> bool:
    """Save (asynchronously) if the policy says so at `step`, or always with `force`."""
    return manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      data=ocp.args.JsonSave(data_state)), force=force)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: dict) -> tuple[dict, dict] | None:
    """(state, data_state) of the latest checkpoint, laid out as `abstract_state`; None if there is none."""
    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                             data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]
