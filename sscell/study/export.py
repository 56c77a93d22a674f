"""An sscell model written as the study's Lightning checkpoint, for the study's own code.

The file's `state_dict` loads into the study's module with `load_state_dict(strict=True)`: an MSE
autoencoder into MLPAutoEncoder, a classifier into MLPClassifier (`sscell.study.layout.to_state`).
`hyper_parameters` holds the constructor's arguments as plain values; the two it takes as classes
(`activation`, `output_activation`) are named under `sscell.classes`, to pass when constructing it.
The pickle holds only plain values and tensors, so `torch.load(path, weights_only=True)` reads it.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax
import ml_collections

from sscell.atomic import atomic_file
from sscell.study.checkpoint import write_checkpoint
from sscell.study.layout import to_state


def export_study(path: str | os.PathLike, params: dict, config: ml_collections.ConfigDict, source: str) -> Path:
    """Write `params` (of a model with `config`) as the study's checkpoint at `path`, creating its parents."""
    checkpoint = to_state(jax.device_get(params), config, source)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        write_checkpoint(tmp, checkpoint)
    return path
