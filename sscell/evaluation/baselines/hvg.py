"""hvg: the log1p input's `eval.hvg_genes` highly variable genes themselves, no reduction (the
columns of what the model sees), chosen on the first `eval.baseline_cells` validation cells. Its
fit is the gene choice; its embeddings are not cached (slicing costs nothing), and hold
`eval.hvg_genes` values a cell: on a large store cap the cells with `eval.max_cells`."""
from __future__ import annotations

import dataclasses

import numpy as np

from sscell.evaluation.baselines.registry import CellBatch, FitData, register


@dataclasses.dataclass
class HighlyVariableColumns:
    genes: np.ndarray
    method: str
    fit_seconds: float

    def embed(self, cells: CellBatch) -> np.ndarray:
        return np.asarray(cells.x[:, self.genes], np.float32)


@register("hvg", label="HVG log1p", settings=("hvg_genes", "baseline_cells"), cached=False)
def fit(data: FitData) -> HighlyVariableColumns:
    genes, seconds = data.hvg
    return HighlyVariableColumns(genes, f"HVG({len(genes)}) log1p", seconds)
