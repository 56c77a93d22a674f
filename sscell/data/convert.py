"""Convert CELLxGENE-style .h5ad files into an sscell store (layout: sscell.data.store).

    python -m sscell.data.convert --output=STORE IN1.h5ad [IN2.h5ad | DIR ...] [--vocabulary=GENES.txt]
    python -m sscell.data.convert --output=STORE --append NEW.h5ad

Cells are split by donor unit (dataset_id + donor_id) into train/val/test, which needs at least 3
donor units, or with `--split=cells` cell by cell (seeded; obs donor_id then optional), or by an
obs column of train/val/test values (`--split-column`); the store's attrs record the policy and
`--append` follows it. No split may end up empty. Cells are stored grouped by split, shuffled
within each (inputs: sscell.data.inputs). Memory stays bounded by a block of rows plus the
obs columns as categorical codes (1-2 bytes a column a cell) and at most ~9 bytes a cell
(`_build`; never the cell-id strings or an indptr), whatever the input size, in streaming passes:
0. ids: hash every cell id (8 bytes a cell) to find repeated ids (sscell.data.cell_ids);
1. count: validate every block of counts, count nonzeros per cell, find the largest count;
2. bucket: the split and the shuffled order give each cell its store row; read each input once
   in blocks and append every cell (counts and id) to a scratch file per bucket (a range of
   store rows holding about `bucket_nonzeros` nonzeros), compressed, so no pass gathers scattered rows;
3. write: load one bucket at a time, order its rows, append them (and their ids) to the store and
   delete the bucket's file.
Scratch space (beside the output): the counts and ids compressed (lz4, about the store's size),
shrinking while the store grows, so the peak disk is about the larger of the two plus a bucket.

A second modality (obsm['protein_counts'] or obsm['atac_counts'], sscell.data.modality) held by
every input moves with its cells through the same passes (proteins: per-row parts of the bucket files;
ATAC peaks: per-nonzero parts like the counts', with their own indptr and buckets cut by both),
so store row r keeps cell r's proteins or peaks.

Genes: a --vocabulary file (or a bundle: its model's genes) fixes them (genes outside it are dropped and
counted); without one
the store's genes are the inputs' union, and `--append` grows it: genes new to the store go
after the existing ones (stored gene indices stay valid) and count as unmeasured by every
dataset already in the store. The store's attrs record which (`vocabulary_file`, null: derived).

The store is built in `.STORE.tmp-PID/` beside STORE and renamed into place, so STORE appears
complete or not at all; `--append` builds the merged store there and swaps it in with two
renames. A run killed at any point leaves only that directory: the next run removes it (putting
the previous store back if the kill fell between the two renames) and converts again; an
append rerun skips inputs whose cells are all in the store already.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import resource
import shutil
import sys
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import anndata
import numcodecs
import numpy as np
import pandas as pd
import scipy.sparse
import tqdm
import zarr
from pandas.api.types import union_categoricals

from sscell.data import modality as modalities
from sscell.data.cell_ids import all_in, as_utf8, check_unique, sorted_hashes
from sscell.data.h5columns import categorical_of_strings
from sscell.data.inputs import REQUIRED_OBS, H5adInput, align, id_kind, open_input, read_vocabulary, union_vocabulary
from sscell.data.store import CELLS_PER_CHUNK, CODECS, SPLITS, Store, StoreWriter, count_dtype, index_dtype, open_store
from sscell.errors import SscellError, exit_on_error

BUCKET_NONZEROS = 2**24  # a bucket is loaded whole in pass 3: ~2**24 x 4-8 bytes
BUCKET_ROWS = 2**18      # ... and holds at most this many cells (their ids and rows)
APPEND_NONZEROS = 2**21  # nonzeros gathered from a loaded bucket at a time
SPLIT_POLICIES = ("donor", "cells")  # how cells without a given split are split
NO_DONOR = "unknown"  # obs donor_id of cells from inputs without one (--split=cells)


@dataclasses.dataclass
class _StoreSource:
    """An existing store read back as one more input (for --append); `n_genes` may exceed the
    store's when the vocabulary grows (new genes come last, so the stored indices stay valid)."""

    store: Store
    obs: pd.DataFrame  # kept obs columns as categoricals (RangeIndex)
    split: np.ndarray  # split code per cell
    ids: zarr.Array    # obs/_index
    n_genes: int
    source: str = "store"
    modality: modalities.ModalityReader | modalities.SparseModalityReader | None = None  # its obsm modality
    modality_names: tuple[str, ...] | None = None
    modality_key: str = modalities.PROTEIN_KEY

    @classmethod
    def open(cls, path: Path) -> _StoreSource:
        """The store at `path`, its obs columns read as categoricals, its cell ids left on disk."""
        store = open_store(path)
        group = zarr.open_group(path, mode="r")["obs"]
        columns = {c: pd.Categorical(anndata.io.read_elem(group[c])) for c in group.attrs["column-order"]}
        split = columns.pop("split").codes.astype(np.int8)
        key = modalities.modality_key(store)
        reader = modalities.open_modality(store, key) if key else None
        return cls(store, pd.DataFrame(columns, index=pd.RangeIndex(store.n_cells)), split,
                   group[group.attrs["_index"]], store.n_genes, modality=reader,
                   modality_names=reader.names if reader else None, modality_key=key or modalities.PROTEIN_KEY)

    @property
    def path(self) -> Path:
        return Path(self.store.path)

    @property
    def n_cells(self) -> int:
        return self.store.n_cells

    def measured(self, dataset: str) -> np.ndarray:
        mask = np.zeros(self.n_genes, bool)
        mask[:self.store.n_genes] = self.store.measured[self.store.datasets.index(dataset)]
        return mask

    def read(self, start: int, stop: int) -> scipy.sparse.csr_matrix:
        block = self.store.read_rows(start, stop)
        return scipy.sparse.csr_matrix((block.data, block.indices, block.indptr), shape=(stop - start, self.n_genes))

    def read_ids(self, start: int, stop: int) -> np.ndarray:
        return as_utf8(self.ids[start:stop])

    def read_modality(self, start: int, stop: int) -> np.ndarray | scipy.sparse.csr_matrix:
        if isinstance(self.modality, modalities.SparseModalityReader):
            return self.modality.read_blocks([(start, stop)])[0]
        return self.modality.read([(start, stop)])

    def modality_lengths(self) -> np.ndarray:
        return np.diff(self.modality.indptr)


_Source = H5adInput | _StoreSource


def _row_dtype(n_cells: int) -> np.dtype:
    """Integer dtype of per-cell row numbers: 4 bytes a cell up to 2**31 cells."""
    return np.dtype(np.int32 if n_cells < 2**31 else np.int64)


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


def split_by_cell(n_cells: int, fractions: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Split code per cell (0 train, 1 val, 2 test): round(fractions * n_cells) of each, in a seeded
    random order; with >= 3 cells every split gets at least one. One byte a cell."""
    cuts = np.round(np.cumsum(fractions[:2]) * n_cells).astype(np.int64)
    if n_cells >= 3:
        cuts[0] = np.clip(cuts[0], 1, n_cells - 2)
        cuts[1] = np.clip(cuts[1], cuts[0] + 1, n_cells - 1)
    split = np.repeat(np.arange(len(SPLITS), dtype=np.int8), np.diff(np.r_[0, cuts, n_cells]))
    rng.shuffle(split)
    return split


def _assign_splits(unit: np.ndarray, known: np.ndarray, fractions: Sequence[float],
                   rng: np.random.Generator) -> np.ndarray:
    """Split per cell: `known` where >= 0, else the split of the cell's unit if the unit has known
    cells, else a fresh `split_by_unit` over the cells of units never seen."""
    n_units = int(unit.max()) + 1
    unit_split = np.full(n_units, -1, np.int8)
    unit_split[unit[known >= 0]] = known[known >= 0]
    split = np.where(known >= 0, known, unit_split[unit]).astype(np.int8)
    new = split < 0
    if new.any():
        unseen = np.zeros(n_units, bool)
        unseen[unit[new]] = True
        split[new] = split_by_unit((np.cumsum(unseen) - 1)[unit[new]], fractions, rng)
    return split


def _split_cells(obs: pd.DataFrame, known: np.ndarray, policy: str, fractions: Sequence[float],
                 rng: np.random.Generator, given_by: str) -> np.ndarray:
    """Split code per cell: `known` (given by `given_by`, for errors) where >= 0, the others split by
    `policy`; refuse a split left empty."""
    if policy == "cells":
        split, n_units = known.copy(), None
        split[split < 0] = split_by_cell(int((split < 0).sum()), fractions, rng)
    else:
        unit = _donor_units(obs)
        split, n_units = _assign_splits(unit, known, fractions, rng), int(unit.max()) + 1
    empty = [name for name, n in zip(SPLITS, np.bincount(split, minlength=len(SPLITS))) if n == 0]
    if not empty:
        return split
    which, assigned = " and ".join(empty), int((known < 0).sum())
    if n_units is not None and n_units < len(SPLITS) and assigned:
        raise SscellError(f"the {which} split would be empty: the cells come from {n_units} donor unit(s) "
                          "(dataset_id + donor_id), too few to split by donor; pass --split=cells "
                          "(config: data.split=cells) for a seeded per-cell split, or --split-column=COLUMN "
                          "(config: data.split_column) naming an obs column of train/val/test values")
    given = len(known) - assigned
    raise SscellError(f"the {which} split would be empty: of {len(known)} cells, {assigned} split by {policy}"
                      + (f" and {given} given by {given_by}" if given else "")
                      + "; give that split cells (e.g. in the split column) or convert more cells")


def _donor_units(obs: pd.DataFrame, block: int = 2**20) -> np.ndarray:
    """Donor unit (dataset_id, donor_id) of each cell, numbered 0..k-1 in category order; 4 bytes a cell."""
    dataset, donor = obs["dataset_id"].cat.codes.to_numpy(), obs["donor_id"].cat.codes.to_numpy()
    n_donors = len(obs["donor_id"].cat.categories) + 1  # + 1: code -1 (missing) stays apart

    def keys(lo: int) -> np.ndarray:
        return dataset[lo:lo + block].astype(np.int64) * n_donors + donor[lo:lo + block]

    units = np.unique(np.concatenate([np.unique(keys(lo)) for lo in range(0, len(obs), block)]))
    unit = np.empty(len(obs), np.int32)
    for lo in range(0, len(obs), block):
        unit[lo:lo + block] = np.searchsorted(units, keys(lo))
    return unit


def _shuffled_order(split: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Cell of each store row: the cells grouped by split, shuffled within each."""
    order, at = np.empty(len(split), _row_dtype(len(split))), 0
    for k in range(len(SPLITS)):
        members = np.flatnonzero(split == k)
        part = order[at:at + len(members)]
        part[:] = members
        rng.shuffle(part)
        at += len(members)
    return order


def _merge_obs(sources: Sequence[_Source]) -> pd.DataFrame:
    """The sources' kept obs columns concatenated, as categoricals with sorted categories (RangeIndex)."""
    names = dict.fromkeys(c for src in sources for c in src.obs.columns)
    return pd.DataFrame({
        c: union_categoricals([categorical_of_strings(src.obs[c].array if c in src.obs  # else all missing
                               else pd.Categorical.from_codes(np.full(src.n_cells, -1, np.int8), categories=[]))
                               for src in sources], sort_categories=True)
        for c in names})


def _measured(sources: Sequence[_Source], genes: pd.Index) -> pd.DataFrame:
    """genes x datasets: a gene counts as measured by a dataset if every source holding it measured it."""
    masks: dict[str, np.ndarray] = {}
    for src in sources:
        for dataset in src.obs["dataset_id"].unique():
            mask = src.measured(dataset)
            masks[dataset] = masks[dataset] & mask if dataset in masks else mask
    return pd.DataFrame({d: masks[d] for d in sorted(masks)}, index=genes)


def _progress(total: int, what: str) -> tqdm.tqdm:
    """A progress bar on stderr, shown only when stderr is a terminal."""
    return tqdm.tqdm(total=total, desc=what, unit="cells", unit_scale=True, disable=None,
                     file=sys.stderr, leave=False)


def _count_pass(sources: Sequence[_Source], block_cells: int) -> tuple[np.ndarray, int]:
    """Validate every block of counts; return nonzeros per cell (sources concatenated) and the max count."""
    nnz, at, max_count = np.empty(sum(src.n_cells for src in sources), np.int32), 0, 0
    with _progress(len(nnz), "checking") as bar:
        for src in sources:
            if isinstance(src, _StoreSource):  # already valid; keep its count dtype at least
                nnz[at:at + src.n_cells] = np.diff(src.store.indptr)
                max_count = max(max_count, 0 if src.store.data_dtype == np.uint16 else 2**16)
                at += src.n_cells
                bar.update(src.n_cells)
                continue
            for start in range(0, src.n_cells, block_cells):
                block = src.read(start, min(start + block_cells, src.n_cells))
                nnz[at:at + block.shape[0]] = np.diff(block.indptr)
                max_count = max(max_count, int(block.data.max(initial=0)))
                at += block.shape[0]
                bar.update(block.shape[0])
    return nnz, max_count


def _bucket_starts(lengths: Sequence[np.ndarray], order: np.ndarray, bucket_nonzeros: int, bucket_rows: int,
                   block_cells: int) -> np.ndarray:
    """First store row of each bucket: a new bucket wherever the nonzeros before a row (of any of
    the per-cell `lengths`, cells taken in store `order`) reach a multiple of `bucket_nonzeros`,
    and at least every `bucket_rows` rows. Walked a block of rows at a time (no indptr held)."""
    starts = [np.arange(0, len(order), bucket_rows)]
    for per_cell in lengths:
        before, last = 0, -1  # nonzeros before the block; multiples reached before its previous row
        for lo in range(0, len(order), block_cells):
            ahead = per_cell[order[lo:lo + block_cells]]
            ends = before + np.cumsum(ahead, dtype=np.int64)
            reached = (ends - ahead) // bucket_nonzeros
            starts.append(lo + np.flatnonzero(np.diff(reached, prepend=last)))
            before, last = int(ends[-1]), int(reached[-1])
    return np.unique(np.concatenate(starts))


class _BucketFiles:
    """Scratch of the bucket shuffle: one file per bucket under `folder`, a sequence of records
    (one per block of cells sent to the bucket), each the named parts compressed (blosc lz4, byte
    shuffle) after a header of their compressed lengths. A bucket's file is read whole and removed
    once its cells are in the store, so the scratch shrinks as the store grows. `widths`: values
    per element of parts that are rows of a matrix (e.g. a dense modality)."""

    _codec = numcodecs.Blosc(cname="lz4", clevel=1, shuffle=numcodecs.Blosc.SHUFFLE)

    def __init__(self, folder: Path, dtypes: dict[str, np.dtype], widths: dict[str, int] | None = None):
        self.folder, self.dtypes, self.widths = folder, dtypes, widths or {}
        folder.mkdir()

    def append(self, bucket: int, parts: dict[str, np.ndarray]) -> None:
        encoded = [self._codec.encode(np.ascontiguousarray(parts[name], self.dtypes[name])) for name in self.dtypes]
        with open(self.folder / str(bucket), "ab") as file:
            file.write(np.array([len(e) for e in encoded], np.int64).tobytes() + b"".join(encoded))

    def take(self, bucket: int) -> dict[str, np.ndarray]:
        """The bucket's parts, records concatenated in the order they came (every bucket holds a
        row, so it has a file); its file removed."""
        path = self.folder / str(bucket)
        raw = memoryview(path.read_bytes())
        pieces: dict[str, list[np.ndarray]] = {name: [] for name in self.dtypes}
        at, header = 0, 8 * len(self.dtypes)
        while at < len(raw):
            lengths = np.frombuffer(raw[at:at + header], np.int64)
            at += header
            for name, length in zip(self.dtypes, lengths.tolist()):
                values = np.frombuffer(self._codec.decode(raw[at:at + length]), self.dtypes[name])
                pieces[name].append(values.reshape(-1, self.widths[name]) if name in self.widths else values)
                at += length
        path.unlink()
        return {name: np.concatenate(p) for name, p in pieces.items()}


def _bucket_pass(sources: Sequence[_Source], dest: np.ndarray, starts: np.ndarray, buckets_on_disk: _BucketFiles,
                 block_cells: int) -> None:
    """Pass 2 of the module docstring: concatenated-source cell i goes to store row dest[i], in
    the bucket k with starts[k] <= dest[i] < starts[k + 1]; each block of each source sends every
    bucket its cells' parts (those `buckets_on_disk` holds: rows, ids, lengths, indices, data, and
    a dense modality's rows or a sparse one's lengths, indices and data) as one compressed record."""
    dtypes = buckets_on_disk.dtypes
    per_row = [name for name in ("rows", "ids", "modality") if name in dtypes]
    offset = 0
    with _progress(len(dest), "bucketing") as bar:
        for src in sources:
            for start in range(0, src.n_cells, block_cells):
                stop = min(start + block_cells, src.n_cells)
                rows = dest[offset + start:offset + stop]
                by_bucket = np.argsort(np.searchsorted(starts, rows, "right"), kind="stable")
                blocks = {"": src.read(start, stop)[by_bucket]}
                rows = rows[by_bucket]
                parts = {"rows": rows, "ids": np.asarray(src.read_ids(start, stop), dtypes["ids"])[by_bucket]}
                if "peak_lengths" in dtypes:
                    blocks["peak_"] = src.read_modality(start, stop)[by_bucket]
                elif "modality" in dtypes:
                    parts["modality"] = src.read_modality(start, stop)[by_bucket]
                buckets = np.searchsorted(starts, rows, "right") - 1
                cuts = np.flatnonzero(np.diff(buckets)) + 1
                for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(rows)]):
                    record = {name: parts[name][lo:hi] for name in per_row}
                    for prefix, block in blocks.items():
                        nz_lo, nz_hi = block.indptr[lo], block.indptr[hi]
                        record |= {f"{prefix}lengths": np.diff(block.indptr[lo:hi + 1]),
                                   f"{prefix}indices": block.indices[nz_lo:nz_hi],
                                   f"{prefix}data": block.data[nz_lo:nz_hi]}
                    buckets_on_disk.append(int(buckets[lo]), record)
                bar.update(stop - start)
            offset += src.n_cells


def _write_pass(writer: StoreWriter, buckets_on_disk: _BucketFiles, starts: np.ndarray, n_features: int = 0) -> None:
    """Pass 3: each bucket's cells appended to `writer` in store order, its file removed."""
    with _progress(writer.n_cells, "writing") as bar:
        for k, (lo, hi) in enumerate(itertools.pairwise(np.append(starts, writer.n_cells))):
            _append_bucket(writer, buckets_on_disk.take(k), lo, hi, n_features)
            bar.update(hi - lo)


def _gather_rows(lengths: np.ndarray, starts: np.ndarray, a: int, b: int, indices: np.ndarray, data: np.ndarray,
                 n_columns: int) -> scipy.sparse.csr_matrix:
    """Rows [a, b) of a bucket in store order as csr: `lengths` / `starts` (per row, in store
    order) locate each row's nonzeros in the bucket's `indices` / `data`."""
    local = np.r_[0, np.cumsum(lengths[a:b])]
    gather = np.repeat(starts[a:b] - local[:-1], lengths[a:b]) + np.arange(local[-1])
    return scipy.sparse.csr_matrix((data[gather], indices[gather], local), shape=(b - a, n_columns))


def _append_bucket(writer: StoreWriter, part: dict[str, np.ndarray], lo: int, hi: int, n_peaks: int = 0) -> None:
    """Append store rows [lo, hi) to `writer` from a bucket's parts (rows in the order they came),
    gathering ~APPEND_NONZEROS nonzeros at a time so no full copy of the bucket is made."""
    in_order = np.argsort(part["rows"])

    def layout(prefix: str) -> tuple[np.ndarray, np.ndarray]:  # each row's length and first nonzero, store order
        lengths = part[f"{prefix}lengths"].astype(np.int64)
        return lengths[in_order], (np.cumsum(lengths) - lengths)[in_order]

    x = layout("")
    peaks = layout("peak_") if "peak_lengths" in part else None
    step = max(1, APPEND_NONZEROS * (hi - lo) // max(int(x[0].sum()), 1))
    for a in range(0, hi - lo, step):
        b = min(a + step, hi - lo)
        block = _gather_rows(*x, a, b, part["indices"], part["data"], writer.n_genes)
        if peaks is not None:
            modality = _gather_rows(*peaks, a, b, part["peak_indices"], part["peak_data"], n_peaks)
        else:
            modality = part["modality"][in_order[a:b]] if "modality" in part else None
        writer.append(block, np.char.decode(part["ids"][in_order[a:b]], "utf-8"), modality)


def _record_rounding(sources: Sequence[_Source], attrs: dict) -> None:
    """After the count pass: record in `attrs` the share of non-integer counts each input read
    with round_counts had (and so rounded), and warn on stderr about those with any."""
    for src in sources:
        if isinstance(src, H5adInput) and src.round_counts:
            share = src.non_integer_share
            attrs["rounded_counts"][str(src.path)] = share
            if share > 0:
                print(f"warning: {src.path}: rounded {share:.2%} of the stored counts in {src.source} to integers "
                      "(--round-counts); they were not raw counts", file=sys.stderr)


def _build(sources: Sequence[_Source], var: pd.DataFrame, known: np.ndarray, attrs: dict, tmp: Path, *,
           seed: int, split_fractions: Sequence[float], block_cells: int, bucket_nonzeros: int,
           given_by: str = "") -> None:
    """Write the store of `sources` (gene order: var) at tmp/store; `known`: fixed splits (-1:
    assign by attrs["split"]; given_by: where the fixed ones come from, for errors).

    Memory beyond a block and the obs codes, a cell: 9 bytes while checking ids (hash, split), 9
    while ordering (nonzeros, store order, split), 8 while mapping cells to rows, 4 while the
    cells move to buckets (each cell's store row), none while writing the store.
    """
    panel = modalities.common_panel(sources)  # before the long passes: inputs with different panels fail fast
    obs = _merge_obs(sources)
    rng = np.random.default_rng(seed)
    split = _split_cells(obs, known, attrs["split"], split_fractions, rng, given_by)  # fails fast too
    id_bytes = check_unique(sources, block_cells)
    nnz, max_count = _count_pass(sources, block_cells)
    _record_rounding(sources, attrs)
    order = _shuffled_order(split, rng)
    for c in obs:  # into store order a column at a time
        obs[c] = pd.Categorical.from_codes(obs[c].cat.codes.to_numpy()[order], dtype=obs[c].dtype)
    obs["split"] = pd.Categorical.from_codes(split[order], SPLITS)
    del split
    sparse_modality = bool(panel) and panel[0] in modalities.SPARSE_KEYS  # ATAC peaks: nonzeros of their own
    lengths = [nnz] + ([np.concatenate([src.modality_lengths() for src in sources])] if sparse_modality else [])
    starts = _bucket_starts(lengths, order, bucket_nonzeros, BUCKET_ROWS, block_cells)
    nonzeros = [int(per_cell.sum(dtype=np.int64)) for per_cell in lengths]
    del nnz, lengths
    dest = np.empty_like(order)
    for lo in range(0, len(order), block_cells):  # dest[order] = arange, without a cell-long temporary
        dest[order[lo:lo + block_cells]] = np.arange(lo, min(lo + block_cells, len(order)), dtype=order.dtype)
    del order
    writer = StoreWriter(tmp / "store", len(dest), nonzeros[0], len(var), count_dtype(max_count), attrs,
                         modality=(*panel, nonzeros[1]) if sparse_modality else panel)
    n_features = len(panel[1]) if panel else 0
    dtypes = {"rows": dest.dtype, "ids": np.dtype(f"S{id_bytes}"), "lengths": np.dtype(np.int32),
              "indices": writer.indices_dtype, "data": writer.data_dtype}
    if sparse_modality:
        dtypes |= {"peak_lengths": np.dtype(np.int32), "peak_indices": index_dtype(n_features),
                   "peak_data": np.dtype(np.float32)}
    elif n_features:
        dtypes["modality"] = np.dtype(np.float32)
    buckets_on_disk = _BucketFiles(tmp / "buckets", dtypes, {"modality": n_features} if "modality" in dtypes else None)
    _bucket_pass(sources, dest, starts, buckets_on_disk, block_cells)
    del dest
    _write_pass(writer, buckets_on_disk, starts, n_features)
    writer.close(obs, var, {"measured": _measured(sources, var.index)})


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(output: Path) -> None:
    """Remove build directories of killed runs; put back a store an append had moved aside."""
    for tmp in output.parent.glob(f".{output.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
            continue  # another conversion at work
        if (tmp / "old").is_dir() and not output.exists():
            os.rename(tmp / "old", output)
        shutil.rmtree(tmp, ignore_errors=True)


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _report(output: Path, t0: float, cells_written: int, **extra) -> dict:
    """The run's report, its figures read back from the finished store."""
    store = open_store(output)
    seconds = time.perf_counter() - t0
    size = _disk_bytes(output)
    return {
        "output": str(output), "cells": store.n_cells, "genes": store.n_genes, "nonzeros": int(store.indptr[-1]),
        "split_cells": {s: int(np.diff(store.split_range(s))[0]) for s in SPLITS}, **extra,
        "gene_coverage": {d: round(float(m.mean()), 4) for d, m in zip(store.datasets, store.measured)},
        "bytes_on_disk": size, "bytes_per_cell": size / store.n_cells, "seconds": seconds,
        "cells_per_s": cells_written / seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        **({"traced_peak_bytes": tracemalloc.get_traced_memory()[1]} if tracemalloc.is_tracing() else {}),
    }


class InputOpener(Protocol):
    """An input that is not a file, opened like one (e.g. a SOMA query, sscell.data.census)."""

    def __call__(self, stack: contextlib.ExitStack, *, gene_column: str | None, round_counts: bool,
                 split_column: str | None, required_obs: tuple[str, ...]) -> H5adInput: ...


def _expand(inputs: Sequence[str | os.PathLike | InputOpener]) -> list[Path | InputOpener]:
    """Input paths, a directory standing for the .h5ad files in it; openers as they are."""
    paths = []
    for p in inputs:
        if not isinstance(p, (str, os.PathLike)):
            paths.append(p)
            continue
        p = Path(p)
        paths.extend(sorted(p.glob("*.h5ad")) if p.is_dir() else [p])
    return paths


def _gene_table(h5ads: Sequence[H5adInput], genes: pd.Index) -> pd.DataFrame:
    """The var rows of `genes`, each from the first input holding it (NaN where none does)."""
    var = pd.concat([inp.var for inp in h5ads])
    return var[~var.index.duplicated()].reindex(genes)


def _given_splits(h5ads: Sequence[H5adInput]) -> np.ndarray:
    """Per cell of the inputs: the split code from --split-column, or -1 (assign by donor unit)."""
    return np.concatenate([inp.given_split if inp.given_split is not None else np.full(inp.n_cells, -1, np.int8)
                           for inp in h5ads])


def convert(inputs: Sequence[str | os.PathLike | InputOpener], output: str | os.PathLike, *, vocabulary: str | None = None,
            append: bool = False, gene_column: str | None = None, round_counts: bool = False,
            split_column: str | None = None, split: str | None = None, seed: int = 0,
            split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), block_cells: int = 8192,
            bucket_nonzeros: int = BUCKET_NONZEROS, codec: str = "lz4", chunk_cells: int = CELLS_PER_CHUNK) -> dict:
    """Write the cells of `inputs` (.h5ad files, directories of them, or `InputOpener`s) into a store at `output`.

    vocabulary: a text file of gene ids, one per line, fixing the store's genes and their order
    (or an sscell bundle, or its genes.csv: the bundle's genes in its input order); by default the union of the inputs' genes in first-seen order. append: add the inputs to the
    existing store at `output` (cells of donor units already in it keep their split; its genes
    stay, followed by the inputs' new genes unless it was made with a vocabulary file).
    gene_column: a var column holding the gene ids (default: the var index).
    round_counts: round non-integer counts instead of refusing them (warned on stderr, and the
    share rounded per input recorded in the store's attrs). split: "donor" (the default for a new
    store; needs >= 3 donor units) or "cells" (obs donor_id optional); an append follows the
    store's. split_column: an obs column of train/val/test values that overrides the split policy
    for the inputs' cells. codec / chunk_cells: X's blosc compressor and cells per inner chunk
    (`sscell.data.store`; an append keeps the store's). Returns the report.
    """
    t0 = time.perf_counter()
    output = Path(output)
    paths = _expand(inputs)
    if not paths:
        raise SscellError("no input files given")
    if len(split_fractions) != 3 or min(split_fractions) < 0 or abs(sum(split_fractions) - 1) > 1e-6:
        raise SscellError(f"split_fractions {split_fractions} must be three non-negative numbers summing to 1")
    if split is not None and split not in SPLIT_POLICIES:
        raise SscellError(f"unknown split policy {split!r}; use one of {', '.join(SPLIT_POLICIES)}")
    if min(block_cells, bucket_nonzeros, chunk_cells) < 1:
        raise SscellError(f"block_cells ({block_cells}), bucket_nonzeros ({bucket_nonzeros}) and chunk_cells "
                          f"({chunk_cells}) must be at least 1")
    if append and vocabulary:
        raise SscellError("--append keeps the store's genes (and grows them if it was made without --vocabulary); "
                          "drop --vocabulary")
    output.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(output)
    if append and not output.exists():
        raise SscellError(f"{output} does not exist; drop --append to create it")
    if not append and output.exists():
        raise SscellError(f"{output} exists; remove it, choose another --output or pass --append")

    with contextlib.ExitStack() as stack:
        old = _StoreSource.open(output) if append else None
        previous = dict(zarr.open_group(output, mode="r").attrs["sscell"]) if append else {}
        policy = previous.get("split", "donor") if append else split or "donor"
        if split is not None and split != policy:
            raise SscellError(f"{output} was split by {policy} (its attrs record it) and appended cells follow it; "
                              f"drop --split or pass --split={policy}")
        required = tuple(c for c in REQUIRED_OBS if c != "donor_id") if policy == "cells" else REQUIRED_OBS
        options = {"gene_column": gene_column, "round_counts": round_counts, "split_column": split_column,
                   "required_obs": required}
        h5ads = [open_input(p, stack, **options) if isinstance(p, Path) else p(stack, **options) for p in paths]
        for inp in h5ads:
            if "donor_id" not in inp.obs:  # --split=cells: keep the store layout
                inp.obs["donor_id"] = pd.Categorical.from_codes(np.zeros(inp.n_cells, np.int8), [NO_DONOR])
        sources: list[_Source] = []
        attrs = {"inputs": [], "counts_source": [], "seed": seed, "split_fractions": list(split_fractions),
                 "vocabulary_file": str(vocabulary) if vocabulary else None, "split": policy,
                 "rounded_counts": dict(previous.get("rounded_counts", {})),
                 "codec": previous.get("codec", "lz4") if append else codec,
                 "chunk_cells": previous.get("chunk_cells", CELLS_PER_CHUNK) if append else chunk_cells}
        added = 0
        if append:
            hashes, _ = sorted_hashes([old], block_cells)
            skipped = [str(inp.path) for inp in h5ads if all_in(inp, hashes, block_cells)]
            del hashes
            h5ads = [inp for inp in h5ads if str(inp.path) not in skipped]
            if not h5ads:
                return _report(output, t0, 0, split=policy, appended_cells=0, skipped=skipped)
            genes, var, kind = old.store.var.index, old.store.var, id_kind(old.store.var.index)
            what = f"the store's genes ({output})"
            if "vocabulary_file" in previous and previous["vocabulary_file"] is None:  # derived: grows
                union = union_vocabulary(h5ads)
                new_genes = union[~union.isin(genes)]
                genes, var, added = genes.append(new_genes), pd.concat([var, _gene_table(h5ads, new_genes)]), len(new_genes)
                old.n_genes = len(genes)
            sources.append(old)
            attrs.update(inputs=previous["inputs"], counts_source=previous["counts_source"],
                         vocabulary_file=previous.get("vocabulary_file", "unknown"))
            known = np.r_[old.split, _given_splits(h5ads)]
        else:
            skipped = []
            genes = read_vocabulary(vocabulary) if vocabulary else union_vocabulary(h5ads)
            what = f"the vocabulary {vocabulary}" if vocabulary else f"the first input's genes ({h5ads[0].path})"
            var = _gene_table(h5ads, genes)
            known = _given_splits(h5ads)
            kind = None if vocabulary else id_kind(h5ads[0].var.index)  # a union may mix kinds
        for inp in h5ads:
            align(inp, genes, what, kind)
        sources.extend(h5ads)
        attrs["inputs"] = attrs["inputs"] + [str(inp.path) for inp in h5ads]
        attrs["counts_source"] = attrs["counts_source"] + [inp.source for inp in h5ads]

        tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
        tmp.mkdir()
        try:
            _build(sources, var, known, attrs, tmp, seed=seed, split_fractions=split_fractions,
                   block_cells=block_cells, bucket_nonzeros=bucket_nonzeros,
                   given_by=" and ".join([f"obs column {split_column!r}"] * bool(split_column) + ["the store"] * append))
            if append:
                os.rename(output, tmp / "old")
            elif output.exists():
                raise SscellError(f"{output} appeared while converting; remove it or choose another --output")
            os.rename(tmp / "store", output)
        except BaseException:
            if (tmp / "old").is_dir() and not output.exists():
                os.rename(tmp / "old", output)
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return _report(output, t0, sum(src.n_cells for src in sources), split=policy,
                   rounded_counts={str(inp.path): attrs["rounded_counts"][str(inp.path)]
                                   for inp in h5ads if round_counts},
                   appended_cells=sum(inp.n_cells for inp in h5ads) if append else 0, skipped=skipped,
                   counts_source={str(inp.path): inp.source for inp in h5ads}, genes_added=added,
                   genes_dropped={str(inp.path): inp.dropped for inp in h5ads})


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point; prints the report as JSON."""
    parser = argparse.ArgumentParser(prog="python -m sscell.data.convert", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help=".h5ad files or directories holding them")
    parser.add_argument("--output", required=True, help="store directory to create (or to extend with --append)")
    parser.add_argument("--append", action="store_true",
                        help="add the inputs' cells (and, unless it was made with --vocabulary, their new genes) "
                             "to the existing store")
    parser.add_argument("--vocabulary", help="text file of gene ids, one per line, or an sscell bundle (its genes, "
                                             "e.g. to fine-tune or evaluate it on the store) (default: the inputs' genes)")
    parser.add_argument("--gene-column", help="var column holding gene ids (default: the var index)")
    parser.add_argument("--round-counts", action="store_true",
                        help="round non-integer counts (e.g. ambient-corrected) to integers instead of refusing them")
    parser.add_argument("--split", choices=SPLIT_POLICIES,
                        help="split cells by donor unit (dataset_id + donor_id, needs >= 3; the default) or cell "
                             "by cell (obs donor_id then optional); --append follows the store's policy")
    parser.add_argument("--split-column", help="obs column of train/val/test values overriding the split policy")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split and the cell order")
    parser.add_argument("--split-fractions", type=float, nargs=3, default=(0.7, 0.15, 0.15),
                        metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--block-cells", type=int, default=8192, help="rows read at a time")
    parser.add_argument("--bucket-nonzeros", type=int, default=BUCKET_NONZEROS,
                        help="nonzeros per shuffle bucket (bounds memory of the write pass)")
    parser.add_argument("--codec", choices=CODECS, default="lz4",
                        help="X's blosc compressor: lz4 (fastest reads) or zstd (fewer bytes; docs/performance.md)")
    parser.add_argument("--chunk-cells", type=int, default=CELLS_PER_CHUNK,
                        help="cells' worth of nonzeros per compressed chunk of X: fewer decode less per random "
                             "block, more compress a little better and mean fewer requests to object storage")
    args = parser.parse_args(argv)
    with exit_on_error():
        report = convert(args.inputs, args.output, vocabulary=args.vocabulary, append=args.append,
                         gene_column=args.gene_column, round_counts=args.round_counts,
                         split_column=args.split_column, split=args.split, seed=args.seed,
                         split_fractions=tuple(args.split_fractions), block_cells=args.block_cells,
                         bucket_nonzeros=args.bucket_nonzeros, codec=args.codec,
                         chunk_cells=args.chunk_cells)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
