"""pca_hvg: PCA(`eval.pca_components`) of the log1p input's `eval.hvg_genes` highly variable
genes (Seurat dispersion, `sscell.data.genes`), both chosen and fitted on the first
`eval.baseline_cells` validation cells."""
from __future__ import annotations

import time

from sscell.evaluation.baselines.pca import FittedPCA
from sscell.evaluation.baselines.registry import FitData, register
from sscell.evaluation.metrics import fit_pca


@register("pca_hvg", label="PCA of the HVGs", settings=("pca_components", "hvg_genes", "baseline_cells"))
def fit(data: FitData) -> FittedPCA:
    genes, hvg_seconds = data.hvg
    fit_x = data.val_x[:, genes]
    started = time.perf_counter()
    pca = fit_pca(fit_x, data.settings.pca_components, data.seed)
    return FittedPCA(pca, f"PCA({pca.n_components_}) HVG({len(genes)})", hvg_seconds + time.perf_counter() - started,
                     genes)
