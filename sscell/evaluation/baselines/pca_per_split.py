"""pca_per_split: the study's PCA baseline, PCA(`eval.pca_components`) of the log1p-normalised
counts of every gene fitted anew on each evaluated split's own cells (ssl_in_scg,
notebooks/data/PCA.ipynb: `IncrementalPCA(64).fit_transform` of the test split alone, and of the
validation split alone for the kNN reference). The two splits' axes are therefore not the same
axes: that is the study's protocol (`eval.protocol="study"` scores it), not a sound baseline."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import scipy.sparse as sp

from sscell.evaluation.baselines.registry import CellBatch, FitData, register
from sscell.evaluation.metrics import fit_pca


@dataclasses.dataclass
class PerSplitPCA:
    """Collects a split's log1p input (`embed`, sparse) and embeds it by its own PCA (`finish`)."""

    components: int
    seed: int
    method: str
    fit_seconds: float = 0.0

    def embed(self, cells: CellBatch) -> sp.csr_matrix:
        return sp.csr_matrix(cells.x)

    def finish(self, parts: list[sp.csr_matrix]) -> np.ndarray:
        x = sp.vstack(parts, format="csr")
        started = time.perf_counter()
        embedding = fit_pca(x, self.components, self.seed).transform(x).astype(np.float32)
        self.fit_seconds = max(self.fit_seconds, time.perf_counter() - started)  # the slower split's fit
        return embedding


@register("pca_per_split", label="PCA fitted per split (the study's)", settings=("pca_components",))
def fit(data: FitData) -> PerSplitPCA:
    return PerSplitPCA(data.settings.pca_components, data.seed, f"PCA({data.settings.pca_components}) per split")
