"""Pretext tasks; importing a task module registers it."""
from sscell.losses import masking  # noqa: F401  (registers "masked")
from sscell.losses.registry import get_loss, register

__all__ = ["get_loss", "register"]
