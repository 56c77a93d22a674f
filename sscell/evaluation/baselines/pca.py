"""pca: PCA(`eval.pca_components`) of the log1p-normalised counts of every gene, fitted on the
first `eval.baseline_cells` validation cells. The integration scores' unintegrated reference, and
the one baseline that reconstructs (projecting back to genes)."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
from sklearn.decomposition import PCA

from sscell.evaluation.baselines.registry import CellBatch, FitData, register
from sscell.evaluation.metrics import fit_pca


@dataclasses.dataclass
class FittedPCA:
    """A PCA of the log1p input's `genes` columns (None: every gene)."""

    pca: PCA
    method: str
    fit_seconds: float
    genes: np.ndarray | None = None

    def embed(self, cells: CellBatch) -> np.ndarray:
        return self.pca.transform(cells.x if self.genes is None else cells.x[:, self.genes]).astype(np.float32)

    def reconstruct(self, x: np.ndarray) -> np.ndarray:
        return self.pca.inverse_transform(self.pca.transform(x))


@register("pca", label="PCA of log1p counts", settings=("pca_components", "baseline_cells"), reconstructs=True)
def fit(data: FitData) -> FittedPCA:
    fit_x = data.val_x
    started = time.perf_counter()
    pca = fit_pca(fit_x, data.settings.pca_components, data.seed)
    return FittedPCA(pca, f"PCA({pca.n_components_}) log1p", time.perf_counter() - started)
