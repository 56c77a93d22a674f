"""Convert CELLxGENE-style .h5ad files into an sscell store (layout: sscell.data.store).

    python -m sscell.data.convert --output=STORE IN1.h5ad [IN2.h5ad ...] [--seed 0]

Counts come from layers['counts'], else raw.X, else X. Cells are split by donor unit
(dataset_id + donor_id) into train/val/test and stored grouped by split, shuffled within each.

Inputs are opened lazily with h5py and anndata's element readers (`anndata.io.read_elem` for
obs/var, `anndata.io.sparse_dataset` for the counts), because `read_h5ad(backed='r')` loads
layers, obsm and uns into memory. Two passes, each in blocks of `block_cells` rows, keep memory
to a block plus a few numbers per cell:
1. validate counts, count nonzeros per cell, find the largest count (which picks the data dtype);
2. for each block of output rows, gather its cells from the inputs by sorted fancy indexing and
   append them to the store.
Out-of-core at 20 M cells: pass 2's gathers read rows scattered over every input for every block;
at that scale replace them with a bucket pass (stream each input once, sending each cell to a
temporary bucket per output block range, then shuffle within buckets).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse

from sscell.data.store import SPLITS, StoreWriter
from sscell.errors import SscellError, exit_on_error

REQUIRED_OBS = ("cell_type", "donor_id")
OPTIONAL_OBS = ("cell_type_ontology_term_id", "dataset_id", "assay", "tissue")


@dataclasses.dataclass
class _Input:
    """One opened .h5ad: its counts matrix (lazy), obs, gene ids and column mapping."""

    path: Path
    counts: anndata.abc.CSRDataset | h5py.Dataset
    source: str                 # where the counts came from, for the report
    obs: pd.DataFrame           # kept columns only, values as strings
    var: pd.DataFrame           # index: gene ids of the counts' columns
    columns: np.ndarray | None = None  # store column of each input column; None when identical

    def read(self, rows: slice | np.ndarray) -> scipy.sparse.csr_matrix:
        """Rows (a slice or sorted indices) as csr in store gene order, explicit zeros dropped."""
        block = scipy.sparse.csr_matrix(self.counts[rows])
        block.eliminate_zeros()
        if self.columns is not None:
            block.indices = self.columns[block.indices]
            block.has_sorted_indices = False
            block.sort_indices()
        return block

    def check(self, data: np.ndarray, rows: str) -> None:
        """Raise if `data` (stored values of some rows) are not non-negative integer counts."""
        problem = None
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            problem = "NaN or infinite values"
        elif data.dtype.kind in "fi" and (data < 0).any():
            problem = "negative values"
        elif data.dtype.kind == "f" and (data != np.round(data)).any():
            problem = "non-integer values (normalised data?)"
        elif data.dtype.kind not in "fiu":
            problem = f"values of dtype {data.dtype}"
        if problem:
            raise SscellError(f"{self.path}: counts in {self.source} have {problem} in rows {rows}; "
                              "convert needs raw integer counts")


def _open_input(path: Path, stack: contextlib.ExitStack) -> _Input:
    if not path.is_file():
        raise SscellError(f"{path}: no such input file")
    try:
        f = stack.enter_context(h5py.File(path, "r"))
    except OSError as e:
        raise SscellError(f"{path}: cannot read it as .h5ad ({e})") from None
    if "layers/counts" in f:
        key, source, var_key = "layers/counts", "layers['counts']", "var"
    elif "raw/X" in f:
        key, source, var_key = "raw/X", "raw.X", "raw/var"
    else:
        key, source, var_key = "X", "X", "var"
    if isinstance(f[key], h5py.Dataset):
        counts = f[key]
    else:
        counts = anndata.io.sparse_dataset(f[key])
        if counts.format != "csr":
            raise SscellError(f"{path}: counts in {source} are stored as {counts.format}; "
                              "rewrite them as csr (e.g. adata.X = adata.X.tocsr()) and convert again")
    obs = anndata.io.read_elem(f["obs"])
    missing = [c for c in REQUIRED_OBS if c not in obs.columns]
    if missing:
        raise SscellError(f"{path}: obs lacks required column(s) {', '.join(missing)}")
    for c in REQUIRED_OBS:
        if obs[c].isna().any():
            raise SscellError(f"{path}: obs column {c} has missing values")
    kept = pd.DataFrame({c: obs[c].map(str, na_action="ignore") for c in REQUIRED_OBS + OPTIONAL_OBS if c in obs})
    if "dataset_id" not in kept:
        kept["dataset_id"] = path.stem
    kept.index = obs.index.astype(str)
    var = anndata.io.read_elem(f[var_key])
    if var.index.has_duplicates:
        raise SscellError(f"{path}: gene id {var.index[var.index.duplicated()][0]!r} appears more than once "
                          f"in {var_key}")
    return _Input(path, counts, source, kept, var)


def _align_genes(inputs: list[_Input]) -> None:
    """Map each later input's genes onto the first input's order (the vocabulary)."""
    vocab = inputs[0].var.index
    for inp in inputs[1:]:
        genes = inp.var.index
        missing, extra = vocab.difference(genes), genes.difference(vocab)
        if len(missing) or len(extra):
            raise SscellError(f"{inp.path}: genes differ from {inputs[0].path} ({len(missing)} missing, e.g. "
                              f"{list(missing[:3])}; {len(extra)} extra, e.g. {list(extra[:3])}); "
                              "all inputs must measure the same gene set")
        if not genes.equals(vocab):
            inp.columns = vocab.get_indexer(genes)


def _merge_obs(inputs: list[_Input]) -> pd.DataFrame:
    """The inputs' kept obs columns, concatenated, as categoricals; cell ids must be unique."""
    obs = pd.concat([inp.obs for inp in inputs])
    duplicated = obs.index[obs.index.duplicated()]
    if len(duplicated):
        cell = duplicated[0]
        where = ", ".join(str(inp.path) for inp in inputs if cell in inp.obs.index)
        raise SscellError(f"cell id {cell!r} appears more than once (in {where}); cell ids must be unique")
    return obs[[c for c in REQUIRED_OBS + OPTIONAL_OBS if c in obs]].astype("category")


def split_by_unit(unit: np.ndarray, fractions: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Split code per cell (0 train, 1 val, 2 test), keeping each unit (unit[i] in 0..k-1) whole.

    Units are shuffled, then walked in order: train until it holds >= fractions[0] of the cells,
    val until train + val hold >= fractions[0] + fractions[1], the rest test. With >= 3 units
    every split gets at least one.
    """
    n_units = int(unit.max()) + 1
    perm = rng.permutation(n_units)
    sizes = np.bincount(unit, minlength=n_units)[perm]
    before = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # cells assigned before each unit
    cuts = np.searchsorted(before, np.cumsum(fractions[:2]) * len(unit), "left")
    if n_units >= 3:
        cuts[0] = np.clip(cuts[0], 1, n_units - 2)
        cuts[1] = np.clip(cuts[1], cuts[0] + 1, n_units - 1)
    split_of_unit = np.empty(n_units, np.int8)
    split_of_unit[perm] = np.searchsorted(cuts, np.arange(n_units), "right")
    return split_of_unit[unit]


def _count_pass(inputs: list[_Input], block_cells: int) -> tuple[np.ndarray, int]:
    """Validate every block of counts; return nonzeros per cell (inputs concatenated) and the max count."""
    nnz, max_count = [], 0
    for inp in inputs:
        for start in range(0, len(inp.obs), block_cells):
            stop = min(start + block_cells, len(inp.obs))
            block = inp.read(slice(start, stop))
            inp.check(block.data, f"{start}-{stop - 1}")
            nnz.append(np.diff(block.indptr))
            max_count = max(max_count, int(block.data.max(initial=0)))
    return np.concatenate(nnz), max_count


def _gather(inputs: list[_Input], offsets: np.ndarray, cells: np.ndarray) -> scipy.sparse.csr_matrix:
    """Rows `cells` (indices into the concatenated inputs) in the given order."""
    by_input = np.argsort(cells, kind="stable")
    ordered = cells[by_input]
    bounds = np.searchsorted(ordered, offsets)
    parts = [inp.read(ordered[lo:hi] - offset)
             for inp, offset, lo, hi in zip(inputs, offsets, bounds[:-1], bounds[1:]) if hi > lo]
    return scipy.sparse.vstack(parts, format="csr")[np.argsort(by_input)]


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _build(paths: Sequence[Path], store: Path, seed: int, split_fractions: Sequence[float],
           block_cells: int) -> dict:
    """Write the store at `store` (an existing empty directory); return the report's numbers."""
    with contextlib.ExitStack() as stack:
        inputs = [_open_input(p, stack) for p in paths]
        _align_genes(inputs)
        obs = _merge_obs(inputs)
        if len(obs) == 0:
            raise SscellError("the inputs hold no cells")
        nnz, max_count = _count_pass(inputs, block_cells)
        if max_count >= 2**32:
            raise SscellError(f"a count of {max_count} does not fit the store's uint32 counts; check the inputs")

        rng = np.random.default_rng(seed)
        unit = obs.groupby(["dataset_id", "donor_id"], observed=True).ngroup().to_numpy()
        split = split_by_unit(unit, split_fractions, rng)
        order = np.concatenate([rng.permutation(np.flatnonzero(split == k)) for k in range(len(SPLITS))])
        obs = obs.iloc[order].assign(split=pd.Categorical.from_codes(split[order], SPLITS))

        indptr = np.concatenate([[0], np.cumsum(nnz[order])])
        offsets = np.cumsum([0] + [len(inp.obs) for inp in inputs])
        var = inputs[0].var
        counts_source = {str(inp.path): inp.source for inp in inputs}
        attrs = {"inputs": list(counts_source), "counts_source": list(counts_source.values()),
                 "seed": seed, "split_fractions": list(split_fractions)}
        writer = StoreWriter(store, indptr, len(var), np.uint16 if max_count < 2**16 else np.uint32, attrs)
        for start in range(0, len(order), block_cells):
            writer.append(_gather(inputs, offsets, order[start:start + block_cells]))
        writer.close(obs, var)
    return {"cells": len(obs), "genes": len(var), "nonzeros": int(indptr[-1]), "counts_source": counts_source,
            "split_cells": {name: int((split == k).sum()) for k, name in enumerate(SPLITS)}}


def convert(inputs: Sequence[str | os.PathLike], output: str | os.PathLike, *, seed: int = 0,
            split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
            block_cells: int = 8192) -> dict:
    """Write the cells of `inputs` (.h5ad) into a new store at `output`; return a report dict.

    The store is built in a temporary directory beside `output` and renamed into place at the
    end, so `output` either appears complete or not at all.
    """
    t0 = time.perf_counter()
    output = Path(output)
    if output.exists():
        raise SscellError(f"{output} exists; remove it or choose another --output")
    if not inputs:
        raise SscellError("no input files given")
    if len(split_fractions) != 3 or min(split_fractions) < 0 or abs(sum(split_fractions) - 1) > 1e-6:
        raise SscellError(f"split_fractions {split_fractions} must be three non-negative numbers summing to 1")
    if block_cells < 1:
        raise SscellError(f"block_cells is {block_cells}; it must be at least 1")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        report = {"output": str(output), **_build([Path(p) for p in inputs], tmp, seed, split_fractions, block_cells)}
        if output.exists():
            raise SscellError(f"{output} exists; remove it or choose another --output")
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    size = _disk_bytes(output)
    return {**report, "bytes_on_disk": size, "bytes_per_cell": size / report["cells"], "seconds": seconds,
            "cells_per_s": report["cells"] / seconds}


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point; prints the report as JSON."""
    parser = argparse.ArgumentParser(prog="python -m sscell.data.convert", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help=".h5ad files (the first one's genes set the gene order)")
    parser.add_argument("--output", required=True, help="store directory to create (must not exist)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split and the cell order")
    parser.add_argument("--split-fractions", type=float, nargs=3, default=(0.7, 0.15, 0.15),
                        metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--block-cells", type=int, default=8192, help="rows read and written at a time")
    args = parser.parse_args(argv)
    with exit_on_error():
        report = convert(args.inputs, args.output, seed=args.seed, split_fractions=tuple(args.split_fractions),
                         block_cells=args.block_cells)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
