"""Pretext tasks by name.

Each is a pure function `(params, batch, key, *, model, config, train=True) -> (loss, metrics)`:
`train=False` (validation) turns dropout off but keeps the task's own randomness.

`batch["x"]` holds log1p-normalised expression (cells x genes) and the integer labels of the
loader; `config` is the run's `config.loss` section. A new task is one module that decorates
its loss with `@register("name")` and is imported in `sscell/losses/__init__.py`.
"""
from __future__ import annotations

from collections.abc import Callable

from sscell.errors import SscellError

LossFn = Callable[..., tuple]
_LOSSES: dict[str, LossFn] = {}


def register(name: str) -> Callable[[LossFn], LossFn]:
    """Decorator that makes a loss function available as `config.loss.name = name`."""
    def add(fn: LossFn) -> LossFn:
        if name in _LOSSES:
            raise ValueError(f"loss '{name}' is registered twice")
        _LOSSES[name] = fn
        return fn
    return add


def get_loss(name: str) -> LossFn:
    """The registered loss called `name`."""
    if name not in _LOSSES:
        raise SscellError(f"unknown loss '{name}'; choose one of: {', '.join(sorted(_LOSSES))}")
    return _LOSSES[name]
