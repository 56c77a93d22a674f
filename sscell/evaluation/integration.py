"""Data-integration scores of embeddings with scib-metrics: bio conservation and batch correction.

scib-metrics' Benchmarker scores every embedding on the same cells: bio conservation
(isolated labels, KMeans NMI/ARI, silhouette of cell types, cLISI) and batch correction
(BRAS, iLISI, graph connectivity, PCR comparison against the unintegrated embedding; kBET
on request: it compiles per cell type and dominates the run time), then averages each group
and weights them 0.6 bio + 0.4 batch into "Total", as in the scIB paper (no min-max scaling
across methods, so a score does not depend on which other methods were run).
Neighbour graphs come from `sscell.evaluation.neighbors` (exact for small inputs).
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping

import anndata
import numpy as np
import pandas as pd

from sscell.errors import SscellError
from sscell.evaluation.neighbors import EXACT_MAX_PAIRS, nearest_neighbors

AGGREGATES = ("Bio conservation", "Batch correction", "Total")


def integration_scores(embeddings: Mapping[str, np.ndarray], labels: np.ndarray, batch: np.ndarray,
                       unintegrated: str, kbet: bool = False, knn_method: str = "auto",
                       exact_max_pairs: float = EXACT_MAX_PAIRS) -> pd.DataFrame:
    """scib-metrics scores (rows: the `embeddings`' names; columns: metrics, then AGGREGATES).

    `labels` and `batch` hold each cell's type and batch (e.g. donor); `unintegrated` names the
    embedding the PCR comparison measures against (e.g. PCA of log1p counts).
    """
    from scib_metrics.benchmark import BatchCorrection, Benchmarker
    from scib_metrics.nearest_neighbors import NeighborsResults

    if unintegrated not in embeddings:
        raise SscellError(f"integration_scores: the unintegrated embedding {unintegrated!r} is not among "
                          f"{list(embeddings)}")
    if len(np.unique(batch)) < 2 or len(np.unique(labels)) < 2:
        raise SscellError("integration scores need at least 2 batches and 2 cell types among the cells")
    n_cells = len(labels)
    obs = pd.DataFrame({"label": pd.Categorical(np.asarray(labels).astype(str)),
                        "batch": pd.Categorical(np.asarray(batch).astype(str))},
                       index=pd.Index(np.arange(n_cells).astype(str)))
    adata = anndata.AnnData(obs=obs, obsm={name: np.asarray(e, np.float32) for name, e in embeddings.items()})

    def neighbors(x: np.ndarray, k: int) -> NeighborsResults:
        indices, distances = nearest_neighbors(x, x, min(k, n_cells), knn_method, exact_max_pairs)
        return NeighborsResults(indices=indices, distances=distances)

    benchmarker = Benchmarker(adata, batch_key="batch", label_key="label", embedding_obsm_keys=list(embeddings),
                              pre_integrated_embedding_obsm_key=unintegrated,
                              batch_correction_metrics=BatchCorrection(kbet_per_label=kbet), progress_bar=False)
    with warnings.catch_warnings():  # scib-metrics and its dependencies warn on small, synthetic inputs
        warnings.simplefilter("ignore")
        previous = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        try:
            benchmarker.prepare(neighbor_computer=neighbors)
            benchmarker.benchmark()
        finally:
            logging.getLogger().setLevel(previous)
        results = benchmarker.get_results(min_max_scale=False)
    results = results.drop(index="Metric Type").astype(float)
    return results.loc[list(embeddings)]
