"""Cells to embed, matched to a trained run's genes: an .h5ad file or an in-memory AnnData.

Both become a `sscell.data.inputs.H5adInput` (counts from layers['counts'], else raw.X, else X,
validated as the converter does), so a file and the same data in memory give the same model
input. Genes are matched through the run's gene table: the input's names (its var index, or the
var column named by `gene_column`) against the table's ids (its index) and each of its text
columns (e.g. `feature_name` symbols), whichever matches most. A run gene the input lacks is
unmeasured, zeroed exactly as in training. Inputs that measure less than `min_overlap` of the
run's genes are refused: the default, 0.5, is the masked pretext task's masking rate, so a
masked run was trained to embed cells from half of their genes, and below that the input is
further from anything the model saw than its training made it for.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import anndata
import numpy as np
import pandas as pd

from sscell.data.inputs import H5adInput, keyed_by_gene, open_input
from sscell.data.loader import shard_nonzeros
from sscell.errors import SscellError

MIN_OVERLAP = 0.5  # share of the run's genes an input must measure (see the module docstring)
FLAGS = ("--min-gene-overlap", "--gene-column")  # what a refusal tells a command's user to change
KEYWORDS = ("min_overlap", "gene_column")  # ... and a Python caller of sscell.Model
IN_MEMORY = Path("AnnData")  # what messages call an in-memory input


@dataclasses.dataclass(frozen=True)
class Overlap:
    """How an input's genes matched a run's: by which key, how many of each side."""

    key: str             # "gene id" or "var['feature_name']" (a column of the run's gene table)
    input_genes: int     # genes in the input
    used: int            # of them, genes of the run (the rest are dropped)
    run_genes: int       # genes of the run
    measured: int        # of them, genes the input measured (the rest are zeroed)

    def describe(self) -> str:
        return (f"{self.used} of the input's {self.input_genes} genes matched by {self.key}; "
                f"{self.measured} of the run's {self.run_genes} genes measured ({self.measured / self.run_genes:.0%})")


def _lookup(values: pd.Series | pd.Index) -> pd.Series:
    """Run gene position by key value, for values that are present and name one gene only."""
    values = pd.Series(np.asarray(values, dtype=object))
    keep = values.notna() & ~values.duplicated(keep=False)
    return pd.Series(np.flatnonzero(keep), index=values[keep].astype(str).to_numpy())


def _gene_keys(genes: pd.DataFrame) -> dict[str, pd.Series]:
    """The gene table's id index and text columns, each as a lookup (`_lookup`)."""
    keys = {"gene id": _lookup(genes.index)}
    for column in genes.columns:
        values = genes[column]
        if not (pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)):
            keys[f"var['{column}']"] = _lookup(values)
    return keys


def match_genes(inp: H5adInput, genes: pd.DataFrame, min_overlap: float = MIN_OVERLAP,
                options: tuple[str, str] = FLAGS) -> Overlap:
    """Map `inp`'s genes onto the run's gene table `genes` (index: ids, in model order) by the key
    that matches most; refuse, in one line naming the caller's `options` (FLAGS or KEYWORDS), an
    input measuring less than `min_overlap` of them."""
    if not 0 <= min_overlap <= 1:  # NaN too
        raise SscellError(f"the minimum gene overlap (min_overlap, --min-gene-overlap) must be a share from 0 to 1, "
                          f"got {min_overlap}")
    names = inp.var.index.astype(str)
    matches = {key: lookup.reindex(names) for key, lookup in _gene_keys(genes).items()}
    key = max(matches, key=lambda k: int(matches[k].notna().sum()))
    columns = matches[key].fillna(-1).to_numpy(np.int32)
    inp.columns, inp.n_genes = columns, len(genes)
    used = int((columns >= 0).sum())
    overlap = Overlap(key, len(names), used, len(genes), len(np.unique(columns[columns >= 0])))
    if overlap.measured < min_overlap * len(genes):
        example = f"e.g. {names[0]!r}" if len(names) else "none"
        overlap_option, gene_option = options
        raise SscellError(f"{inp.path}: the input measures {overlap.measured} of the run's {len(genes)} genes "
                          f"({overlap.measured / len(genes):.0%}), under {overlap_option}={min_overlap:g} "
                          f"({overlap.used} of its {overlap.input_genes} genes matched by {key}; input genes "
                          f"{example}, run genes e.g. {genes.index[0]!r}); check the species and the gene names "
                          f"({gene_option}), or lower {overlap_option}")
    return overlap


def open_h5ad(path: str | Path, stack: contextlib.ExitStack, *, gene_column: str | None = None,
              round_counts: bool = False) -> H5adInput:
    """An .h5ad file to embed (any obs; closed with `stack`)."""
    return open_input(path, stack, gene_column=gene_column, round_counts=round_counts, required_obs=())


def anndata_input(adata: anndata.AnnData, *, gene_column: str | None = None, round_counts: bool = False) -> H5adInput:
    """An in-memory AnnData to embed, its counts found and checked as `open_input` does for a file."""
    if "counts" in adata.layers:
        counts, source, var = adata.layers["counts"], "layers['counts']", adata.var
    elif adata.raw is not None:
        counts, source, var = adata.raw.X, "raw.X", adata.raw.var
    else:
        counts, source, var = adata.X, "X", adata.var
    if adata.n_obs == 0:
        raise SscellError("AnnData: holds no cells")
    var = keyed_by_gene(var.copy(), gene_column, "AnnData", f"the var of {source}")
    obs = pd.DataFrame(index=pd.RangeIndex(adata.n_obs))
    return H5adInput(IN_MEMORY, counts, source, obs, None, var, round_counts)


def input_batches(inp: H5adInput, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """An aligned input's cells in order, as (loader-format batch, n_valid) of `batch_size` cells
    (the last padded with empty cells); every cell is dataset 0 of `inp`'s measured table."""
    for a in range(0, inp.n_cells, batch_size):
        b = min(a + batch_size, inp.n_cells)
        matrix = inp.read(a, b)
        lengths = np.pad(np.diff(matrix.indptr), (0, batch_size - (b - a)))
        yield {**shard_nonzeros(matrix.data, matrix.indices, lengths), "dataset": np.zeros(batch_size, np.int32)}, b - a
