"""sscell: self-supervised pretraining on single-cell gene expression, in JAX.

From Python: `model = sscell.load("runs/x")`, then `model.embed(adata)` / `model.predict(adata)`
(`sscell.api`); `sscell.from_study(checkpoint, genes)` imports one of the study's published models
(`sscell.study`). Importing sscell itself loads nothing heavy.
"""
from __future__ import annotations


def load(path, checkpoint: str | None = None, *, store=None):
    """The trained model (`sscell.api.Model`) of a run's workdir or of a bundle; see `sscell.api.load`."""
    from sscell.api import load as load_model

    return load_model(path, checkpoint, store=store)


def from_study(checkpoint, genes, *, classes=None):
    """The study's Lightning checkpoint as a `sscell.api.Model`; see `sscell.study.importer.from_study`."""
    from sscell.study.importer import from_study as import_study

    return import_study(checkpoint, genes, classes=classes)
