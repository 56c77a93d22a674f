"""A run's pretext task and the data facts it is built from."""
from __future__ import annotations

import ml_collections

from sscell.data.store import Store
from sscell.data.task_data import TaskInfo, task_info
from sscell.losses import load_task
from sscell.losses.registry import Task


def setup_task(config: ml_collections.ConfigDict, store: Store) -> tuple[Task, TaskInfo]:
    """(Task, TaskInfo) of a run: the task named by `config.loss.name` and its data facts."""
    task = load_task(config.loss)
    return task, task_info(config, store, task.programmes)
