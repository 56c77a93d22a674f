"""Deterministic, resumable batches of selected cells of a store, prefetched on threads.

A loader reads a *selection*: the rows of one split, optionally only some datasets' cells and
a fraction of them (`select_rows`), held as a sorted array of store rows. The split's rows are
cut into windows of `block_cells` consecutive rows (the store is shuffled at write time, so a
window is a random sample); a block is the selected rows of one window. Each epoch permutes
the blocks, the permuted sequence of cells is cut into global batches, and each process reads
only its contiguous slice of a global batch - the runs of consecutive selected rows, all
issued at once. Rows outside the selection are never read.

The order is a pure function of (seed, epoch, batch index), so the iterator state is just
the global step, exact resume needs no replay, and every selected cell is seen once per epoch
(bar the last partial batch). The loader's host state per cell is its row (int64) and three
label codes (int32): 20 bytes, no Python objects.

Batch layout (flat CSR per data-parallel shard). A process's slice of a batch is cut into
`shards` equal groups of consecutive cells, one per device of the mesh's "data" axis that the
process feeds; shard s holds its cells' nonzeros concatenated:

    genes   (shards, size)        gene index of each nonzero (the store's uint16 / uint32)
    counts  (shards, size)        its count (the store's uint16 / uint32)
    indptr  (shards, cells + 1)   int32: shard s's cell i is genes/counts[s, indptr[s, i]:indptr[s, i + 1]]
    cell, cell_type, donor, dataset   (shards * cells,) int32: store row and label codes
    modality (shards * cells, features) float32: the rows' second modality (raw protein counts),
                                  only from a loader made with a dense `modality` (sscell.data.modality)
    peaks, peak_counts, peak_indptr   a sparse modality's (ATAC peaks') nonzeros in the layout of
                                  genes / counts / indptr (float32 counts), padded to their own size

`size` is the nonzeros of the epoch's fullest shard rounded up to one of 8 sizes per power of
two (`nnz_bucket`), computed by every process from the in-RAM indptr: one shape per epoch for
jit (usually one for the whole run); the padding past indptr[s, -1] holds zeros. The leading
axis of every field is split over the mesh's "data" axis, so each device densifies its own
cells only (`sscell.data.preprocess.densify`). With uint16 genes and counts the host ships
~4 bytes a nonzero plus 4 a cell, where padded rows (cells x the fullest row) took 4 bytes a
slot: 4.3-4.6x fewer bytes at 19,331 genes (`python -m benchmarks.bench_loader`).
"""
from __future__ import annotations

import collections
import concurrent.futures
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import numpy as np

from sscell.data.modality import SparseModalityReader, open_modality
from sscell.data.preprocess import BATCH_FIELD, PEAK_FIELDS
from sscell.data.store import CsrRows, Store, runs
from sscell.errors import SscellError

LABEL_COLUMNS = {"cell_type": "cell_type", "donor": "donor_id", "dataset": "dataset_id"}
FRACTION_GRANULE = 64  # a fraction keeps whole 64-row windows of the split (contiguous reads)
_FRACTION_STREAM = 2**40  # rng key of the fraction draw, apart from the (seed, epoch) keys
T = TypeVar("T")


def label_codes(store: Store, start: int, stop: int) -> dict[str, np.ndarray]:
    """Integer codes (int32) of the label columns for rows [start, stop) of the store (0 where absent)."""
    return {
        name: store.labels[column].cat.codes.to_numpy()[start:stop].astype(np.int32)
        if column in store.labels else np.zeros(stop - start, np.int32)
        for name, column in LABEL_COLUMNS.items()
    }


def label_names(store: Store, name: str) -> list[str]:
    """The category names behind the codes of label `name` (e.g. the cell types)."""
    return [str(c) for c in store.labels[LABEL_COLUMNS[name]].cat.categories]


def select_rows(store: Store, split: str, *, datasets: Sequence[str] = (), fraction: float = 1.0,
                seed: int = 0) -> np.ndarray:
    """Sorted store rows (int64) of `split`, only `datasets`' cells (all if empty), and of those
    round(fraction * n) cells.

    The fraction keeps whole windows of FRACTION_GRANULE split rows in an order drawn from
    `seed` (the last window trimmed), so it is read in contiguous runs and, the store being
    shuffled, is a random sample; a smaller fraction's cells are a subset of a larger one's.
    """
    start, stop = store.split_range(split)
    rows = np.arange(start, stop, dtype=np.int64)
    if datasets:
        column = LABEL_COLUMNS["dataset"]
        if column not in store.labels:
            raise SscellError(f"the store has no obs['{column}'] to select datasets from; drop the dataset selection")
        labels = store.labels[column]
        codes, names = labels.cat.codes.to_numpy()[start:stop], np.asarray(labels.cat.categories.astype(str))
        present = names[np.bincount(codes, minlength=len(names)) > 0]
        unknown = sorted(set(datasets) - set(present))
        if unknown:
            raise SscellError(f"dataset(s) {', '.join(unknown)} have no cells in split '{split}'; "
                              f"choose from {', '.join(present)}")
        rows = rows[np.isin(names, list(datasets))[codes]]
    if not 0 < fraction <= 1:
        raise SscellError(f"cell fraction {fraction} is not in (0, 1]; choose e.g. 0.1")
    if fraction < 1:
        granule = (rows - start) // FRACTION_GRANULE
        rank = np.empty(-(-(stop - start) // FRACTION_GRANULE), np.int64)  # one per window of the split
        rank[np.random.default_rng([seed, _FRACTION_STREAM]).permutation(len(rank))] = np.arange(len(rank))
        keep = np.argsort(rank[granule], kind="stable")[:round(fraction * len(rows))]
        rows = np.sort(rows[keep])
    return rows


def nnz_bucket(n: int) -> int:
    """Padded length for `n` nonzeros: the next multiple of 1/8 of n's power of two (>= 16), so
    padding stays under 12.5% and a batch sees one of 8 sizes per doubling."""
    n = int(n)
    if n <= 16:
        return 16
    step = 1 << ((n - 1).bit_length() - 4)
    return -(-n // step) * step


def shard_indptr(lengths: np.ndarray, shards: int) -> np.ndarray:
    """(shards, cells / shards + 1) int32 indptr of cells of `lengths` nonzeros cut into `shards`
    equal groups of consecutive cells."""
    cells = len(lengths)
    if cells % shards:
        raise ValueError(f"{cells} cells do not split into {shards} equal shards")
    indptr = np.zeros((shards, cells // shards + 1), np.int32)
    np.cumsum(np.asarray(lengths).reshape(shards, -1), axis=1, out=indptr[:, 1:])
    return indptr


def shard_nonzeros(data: np.ndarray, indices: np.ndarray, lengths: np.ndarray, shards: int = 1,
                   size: int | None = None) -> dict[str, np.ndarray]:
    """{"genes", "counts", "indptr"} of cells in the flat layout of the module docstring.

    `data` / `indices` are the cells' counts / gene indices concatenated in cell order (a CSR
    matrix's `data` and `indices`), `lengths` the cells' nonzeros; the cells are cut into
    `shards` equal groups of consecutive cells. Dtypes are kept; `size` defaults to
    `nnz_bucket` of the fullest shard.
    """
    indptr = shard_indptr(lengths, shards)
    totals = indptr[:, -1]
    size = nnz_bucket(totals.max(initial=0)) if size is None else size
    genes, counts = np.zeros((shards, size), indices.dtype), np.zeros((shards, size), data.dtype)
    for s, (lo, hi) in enumerate(zip(np.cumsum(totals) - totals, np.cumsum(totals))):
        genes[s, :hi - lo], counts[s, :hi - lo] = indices[lo:hi], data[lo:hi]
    return {"genes": genes, "counts": counts, "indptr": indptr}


def read_shards(reader: CsrRows, rows: np.ndarray, shards: int, size: int, cells: int | None = None
                ) -> dict[str, np.ndarray]:
    """`shard_nonzeros` of store `rows` (any order) read from `reader` (a store or a sparse
    modality), padded to `size`: each run of consecutive rows is copied from its read straight
    to its place in its shard, the one pass over the nonzeros a batch needs. `cells` (default
    len(rows)) lays out that many cells, those past the rows empty (a fixed batch shape)."""
    lengths = np.zeros(len(rows) if cells is None else cells, np.int64)
    lengths[:len(rows)] = reader.indptr[rows + 1] - reader.indptr[rows]
    indptr = shard_indptr(lengths, shards)
    totals = indptr[:, -1]
    if totals.max(initial=0) > size:
        raise ValueError(f"a shard of {totals.max()} nonzeros does not fit size {size}")
    shard_cells = len(lengths) // shards
    ranges = runs(rows, shard_cells)
    runs_cells = np.array([stop - start for start, stop in ranges], np.int64)
    first = np.cumsum(runs_cells) - runs_cells  # each run's first position in `rows`
    shard = first // shard_cells
    genes, counts = np.empty((shards, size), reader.indices_dtype), np.empty((shards, size), reader.data_dtype)
    reader.read_nonzeros_into(ranges, shard * size + indptr[shard, first % shard_cells], counts.reshape(-1),
                              genes.reshape(-1))
    for s, total in enumerate(totals.tolist()):
        genes[s, total:], counts[s, total:] = 0, 0
    return {"genes": genes, "counts": counts, "indptr": indptr}


class CellLoader:
    """Batches of the selected cells of one split; `batch(step)` is a pure function of the step.

    `datasets` and `fraction` narrow the split as in `select_rows` (drawn from `seed`). Each
    process's slice of a batch is laid out in `shards` shards (the data-parallel devices it
    feeds: `sscell.training.mesh.local_data_shards`). Cells keep their block order within a
    batch: the store is shuffled at write time, and a step does not depend on the order of
    the cells of its batch. `modality` (an obsm key such as "protein_counts" or "atac_counts")
    adds the rows' values of that modality to every batch, read by the same runs of rows as the counts.
    """

    def __init__(self, store: Store, split: str, batch_size: int, seed: int, *,
                 datasets: Sequence[str] = (), fraction: float = 1.0, block_cells: int = 64,
                 process_index: int = 0, process_count: int = 1, shards: int = 1, prefetch: int = 4,
                 modality: str = ""):
        if batch_size % (process_count * shards):
            raise SscellError(f"batch size {batch_size} is not divisible by the {process_count} process(es) x "
                              f"{shards} data shard(s) each; choose a multiple")
        self.store = store
        self.modality = open_modality(store, modality) if modality else None
        self.rows = select_rows(store, split, datasets=datasets, fraction=fraction, seed=seed)
        self.n_cells = len(self.rows)
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        if self.n_cells < batch_size:
            raise SscellError(f"split '{split}' has {self.n_cells} selected cells, fewer than one batch of "
                              f"{batch_size}; lower the batch size or select more cells")
        self.seed = seed
        self.block_cells = block_cells
        self.process_index = process_index
        self.process_count = process_count
        self.shards = shards
        self.prefetch = prefetch
        self.steps_per_epoch = self.n_cells // batch_size
        start, stop = store.split_range(split)
        self.labels = {name: codes[self.rows - start] for name, codes in label_codes(store, start, stop).items()}
        window = (self.rows - start) // block_cells
        # Block b holds self.rows[bounds[b]:bounds[b + 1]], the selected rows of one window.
        self._bounds = np.r_[0, np.flatnonzero(np.diff(window)) + 1, self.n_cells]
        self._epoch_order = functools.lru_cache(maxsize=2)(self._order)
        self.epoch_size = functools.lru_cache(maxsize=4)(self._size)

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This epoch's block order, and where each block begins in the epoch's cell sequence."""
        blocks = np.random.default_rng([self.seed, epoch]).permutation(len(self._bounds) - 1)
        lengths = (self._bounds[1:] - self._bounds[:-1])[blocks]
        return blocks, np.cumsum(lengths) - lengths

    def _cells(self, epoch: int, first: int, last: int) -> np.ndarray:
        """Indices into `self.rows` of cells [first, last) of the epoch's cell sequence."""
        blocks, positions = self._epoch_order(epoch)
        lo = int(np.searchsorted(positions, first, side="right")) - 1
        hi = int(np.searchsorted(positions, last, side="left"))
        blocks, positions = blocks[lo:hi], positions[lo:hi]
        skip = np.maximum(first - positions, 0)  # cells of each block before `first` / from `last` on
        take = np.minimum(last - positions, self._bounds[blocks + 1] - self._bounds[blocks]) - skip
        return np.repeat(self._bounds[blocks] + skip - (np.cumsum(take) - take), take) + np.arange(take.sum())

    def selection(self, step: int) -> np.ndarray:
        """Indices into `self.rows` of global batch `step`, process slices one after another."""
        epoch, index = divmod(step, self.steps_per_epoch)
        return self._cells(epoch, index * self.batch_size, (index + 1) * self.batch_size)

    def _size(self, epoch: int, peaks: bool = False, chunk_cells: int = 2**18) -> int:
        """The padded size of every shard of the epoch: `nnz_bucket` of its fullest shard, from the
        in-RAM indptr (so one shape per epoch for jit, and every process agrees without reading
        another's cells), counted ~`chunk_cells` cells at a time; `peaks`: of the sparse modality."""
        indptr = self.modality.indptr if peaks else self.store.indptr
        cells = self.steps_per_epoch * self.batch_size
        shard_cells = self.local_batch_size // self.shards
        chunk = max(1, chunk_cells // self.batch_size) * self.batch_size
        fullest = 0
        for first in range(0, cells, chunk):
            rows = self.rows[self._cells(epoch, first, min(first + chunk, cells))]
            lengths = indptr[rows + 1] - indptr[rows]
            fullest = max(fullest, int(lengths.reshape(-1, shard_cells).sum(1).max()))
        return nnz_bucket(fullest)

    def local_selection(self, step: int) -> np.ndarray:
        """This process's slice of `selection(step)`."""
        n = self.local_batch_size
        return self.selection(step)[self.process_index * n:(self.process_index + 1) * n]

    def cell_labels(self, selection: np.ndarray) -> dict[str, np.ndarray]:
        """The "cell" (store row) and label-code fields of a batch of these selected cells."""
        return {"cell": self.rows[selection].astype(np.int32),
                **{name: codes[selection] for name, codes in self.labels.items()}}

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of global batch `step` in the flat sharded layout, with labels."""
        selection = self.local_selection(step)
        rows = self.rows[selection]
        labels = self.cell_labels(selection)
        epoch = step // self.steps_per_epoch
        nonzeros = read_shards(self.store, rows, self.shards, self.epoch_size(epoch))
        if isinstance(self.modality, SparseModalityReader):
            peaks = read_shards(self.modality, rows, self.shards, self.epoch_size(epoch, True))
            labels.update(zip(PEAK_FIELDS, (peaks["genes"], peaks["counts"], peaks["indptr"])))
        elif self.modality is not None:
            labels[BATCH_FIELD] = self.modality.read(runs(rows))
        return {**nonzeros, **labels}

    def iterate(self, start_step: int, stop_step: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches for steps [start_step, stop_step), `prefetch` steps read ahead on as many threads."""
        return prefetched(self.batch, start_step, stop_step, self.prefetch)


def prefetched(batch: Callable[[int], T], start_step: int, stop_step: int, threads: int) -> Iterator[T]:
    """batch(step) for steps [start_step, stop_step) in order, `threads` steps read ahead on as
    many threads (the calls overlap: tensorstore reads and numpy copies release the GIL)."""
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        pending = collections.deque()
        next_step = start_step
        while pending or next_step < stop_step:
            while next_step < stop_step and len(pending) < threads + 1:
                pending.append(pool.submit(batch, next_step))
                next_step += 1
            yield pending.popleft().result()


def sequential_batches(store: Store, start: int, stop: int, batch_size: int, shards: int = 1
                       ) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Rows [start, stop) in store order, as (batch, n_valid) of fixed `batch_size` cells, in
    `CellLoader.batch`'s layout with `shards` shards.

    The last batch is padded with empty cells (no nonzeros) so jit sees one batch shape;
    `n_valid` says how many leading cells are real.
    """
    return row_batches(store, np.arange(start, stop, dtype=np.int64), batch_size, shards)


def row_batches(store: Store, rows: np.ndarray, batch_size: int, shards: int = 1
                ) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Store rows `rows` (any order), in that order, as `sequential_batches` lays out a range."""
    rows = np.asarray(rows, np.int64)
    first = int(rows.min(initial=0))
    labels = label_codes(store, first, int(rows.max(initial=0)) + 1)
    lengths = store.indptr[rows + 1] - store.indptr[rows]
    padded = np.pad(lengths, (0, -len(lengths) % batch_size))
    size = nnz_bucket(padded.reshape(-1, batch_size // shards).sum(1).max(initial=0))  # one shape for all
    for a in range(0, len(rows), batch_size):
        chunk = rows[a:a + batch_size]
        pad = batch_size - len(chunk)
        batch = {name: np.pad(codes[chunk - first], (0, pad)) for name, codes in labels.items()}
        nonzeros = read_shards(store, chunk, shards, size, batch_size)
        yield {**nonzeros, "cell": np.pad(chunk.astype(np.int32), (0, pad)), **batch}, len(chunk)
