"""sscell: self-supervised pretraining on single-cell gene expression, in JAX.

From Python: `model = sscell.load("runs/x")`, then `model.embed(adata)` / `model.predict(adata)`
(`sscell.api`). Importing sscell itself loads nothing heavy.
"""
from __future__ import annotations


def load(path, checkpoint: str | None = None):
    """The trained model (`sscell.api.Model`) of a run's workdir or of a bundle; see `sscell.api.load`."""
    from sscell.api import load as load_model

    return load_model(path, checkpoint)
