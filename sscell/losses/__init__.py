"""Pretext tasks; importing a task module registers it."""
from sscell.losses import barlow_twins, byol, crossmodal, masking, programmes, supervised  # noqa: F401  (register tasks)
from sscell.losses.registry import Task, get_loss, get_task, load_task, register

__all__ = ["Task", "get_loss", "get_task", "load_task", "register"]
