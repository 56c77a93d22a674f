"""Baselines every evaluation scores next to the model; importing a baseline module registers it
(`sscell.evaluation.baselines.registry`)."""
# in the order the results show them by default; pca first: the integration scores' unintegrated reference
from sscell.evaluation.baselines import pca, pca_hvg, hvg, scvi_latent, pca_per_split  # noqa: F401, I001
from sscell.evaluation.baselines.registry import (Baseline, CellBatch, FitData, Fitted, Skipped, load_baselines,
                                                  register, registered)

__all__ = ["Baseline", "CellBatch", "FitData", "Fitted", "Skipped", "load_baselines", "register", "registered"]
