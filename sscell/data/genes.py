"""Gene selection on count matrices: the highly variable genes (the split command's kept genes,
the PCA-on-HVG evaluation baseline)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sscell.errors import SscellError


def highly_variable_genes(x: np.ndarray | sp.spmatrix | sp.sparray, n_top: int = 2000, n_bins: int = 20) -> np.ndarray:
    """Indices (ascending) of the `n_top` genes of highest normalised dispersion in `x`
    (log1p-normalised cells x genes), Seurat's method as in scanpy's `highly_variable_genes`
    (flavor "seurat"): dispersion = variance / mean of expm1(x) per gene, log-scaled, then
    z-scored within `n_bins` equal-width bins of log1p(mean); a bin holding one gene gives it 1.
    """
    x = sp.csr_matrix(x, dtype=np.float64) if sp.issparse(x) else np.asarray(x, np.float64)
    counts = x.expm1() if sp.issparse(x) else np.expm1(x)
    n_cells = x.shape[0]
    if n_cells < 2:
        raise SscellError(f"highly_variable_genes needs at least 2 cells, got {n_cells}")
    mean = np.asarray(counts.mean(axis=0)).ravel()
    mean_sq = np.asarray(counts.multiply(counts).mean(axis=0) if sp.issparse(counts) else (counts**2).mean(axis=0))
    var = (mean_sq.ravel() - mean**2) * (n_cells / (n_cells - 1))
    mean[mean == 0] = 1e-12
    dispersion = var / mean
    dispersion[dispersion == 0] = np.nan
    table = pd.DataFrame({"dispersion": np.log(dispersion), "bin": pd.cut(np.log1p(mean), bins=n_bins)})
    grouped = table.groupby("bin", observed=True)["dispersion"]
    bin_mean, bin_std = grouped.transform("mean"), grouped.transform("std")
    single = bin_std.isna() & table["dispersion"].notna()  # scanpy: a lone gene in its bin scores 1
    bin_mean, bin_std = bin_mean.where(~single, 0.0), bin_std.where(~single, table["dispersion"])
    normalised = ((table["dispersion"] - bin_mean) / bin_std).to_numpy(copy=True)
    normalised[np.isnan(normalised)] = -np.inf
    n_top = min(n_top, x.shape[1])
    return np.sort(np.argsort(-normalised, kind="stable")[:n_top])
