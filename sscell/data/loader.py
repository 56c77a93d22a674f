"""Deterministic, resumable batches of cells from a store, prefetched on threads.

The order is a pure function of (seed, epoch, batch index): the cells of a split are cut
into blocks of `block_cells` consecutive rows (the store is shuffled at write time, so a
block is a random sample); each epoch permutes the blocks, the permuted sequence of cells is
cut into global batches, each process reads only its contiguous slice of a global batch and
shuffles it. The iterator state is therefore just the global step, exact resume needs no
replay, and every cell of the split is seen once per epoch (bar the last partial batch).

Batches are padded sparse rows (`genes`, `counts`: cells x width, width a power of two, so
jit sees few shapes), integer labels and `cell` (each cell's row in the store);
`sscell.data.preprocess` densifies on the device.
"""
from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp

from sscell.data.store import Store
from sscell.errors import SscellError

LABEL_COLUMNS = {"cell_type": "cell_type", "donor": "donor_id", "dataset": "dataset_id"}


def label_codes(store: Store, start: int, stop: int) -> dict[str, np.ndarray]:
    """Integer codes (int32) of the label columns for rows [start, stop) of the store."""
    obs = store.obs.iloc[start:stop]
    return {
        name: np.asarray(obs[column].astype("category").cat.codes, np.int32)
        if column in obs else np.zeros(stop - start, np.int32)
        for name, column in LABEL_COLUMNS.items()
    }


def label_names(store: Store, name: str) -> list[str]:
    """The category names behind the codes of label `name` (e.g. the cell types)."""
    column = store.obs[LABEL_COLUMNS[name]].astype("category")
    return [str(c) for c in column.cat.categories]


def bucket_width(fullest: int, n_genes: int) -> int:
    """Padded row width for rows of at most `fullest` nonzeros: a power of two >= 16, at most n_genes."""
    return min(n_genes, max(16, 1 << (max(fullest, 1) - 1).bit_length()))


def padded_rows(matrix: sp.csr_matrix, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(genes int32, counts float32) of shape (cells, width): each row's nonzeros, zero-padded.

    `width` defaults to the bucket of the fullest row.
    """
    nnz_per_row = np.diff(matrix.indptr)
    if width is None:
        width = bucket_width(int(nnz_per_row.max(initial=1)), matrix.shape[1])
    rows = np.repeat(np.arange(matrix.shape[0]), nnz_per_row)
    cols = np.arange(matrix.nnz) - np.repeat(matrix.indptr[:-1], nnz_per_row)
    genes = np.zeros((matrix.shape[0], width), np.int32)
    counts = np.zeros((matrix.shape[0], width), np.float32)
    genes[rows, cols] = matrix.indices
    counts[rows, cols] = matrix.data
    return genes, counts


class CellLoader:
    """Batches of one split of a store; `batch(step)` is a pure function of the step."""

    def __init__(self, store: Store, split: str, batch_size: int, seed: int, *,
                 block_cells: int = 64, process_index: int = 0, process_count: int = 1,
                 prefetch: int = 4):
        if batch_size % process_count:
            raise SscellError(f"batch size {batch_size} is not divisible by the {process_count} processes; "
                              "choose a multiple")
        self.store = store
        self.start, self.stop = store.split_range(split)
        self.n_cells = self.stop - self.start
        self.batch_size = batch_size
        self.local_batch_size = batch_size // process_count
        if self.n_cells < batch_size:
            raise SscellError(f"split '{split}' has {self.n_cells} cells, fewer than one batch of {batch_size}; "
                              "lower the batch size")
        self.seed = seed
        self.block_cells = block_cells
        self.process_index = process_index
        self.process_count = process_count
        self.prefetch = prefetch
        self.steps_per_epoch = self.n_cells // batch_size
        self.labels = label_codes(store, self.start, self.stop)

    def _epoch_blocks(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Block starts (within the split) in this epoch's order, and where each block
        begins in the epoch's sequence of cells."""
        starts = np.arange(0, self.n_cells, self.block_cells)
        starts = starts[np.random.default_rng([self.seed, epoch]).permutation(len(starts))]
        lengths = np.minimum(starts + self.block_cells, self.n_cells) - starts
        return starts, np.cumsum(lengths) - lengths

    def cell_ranges(self, step: int, process_index: int | None = None) -> list[tuple[int, int]]:
        """Store row ranges [a, b) of a process's slice (default: this one's) of global batch `step`."""
        epoch, index = divmod(step, self.steps_per_epoch)
        starts, positions = self._epoch_blocks(epoch)
        process_index = self.process_index if process_index is None else process_index
        first = index * self.batch_size + process_index * self.local_batch_size
        last = first + self.local_batch_size
        ranges = []
        block = int(np.searchsorted(positions, first, side="right")) - 1
        while block < len(starts) and positions[block] < last:
            offset = self.start + starts[block] - positions[block]
            lo = max(first, positions[block])
            hi = min(last, positions[block] + min(self.block_cells, self.n_cells - starts[block]))
            ranges.append((int(offset + lo), int(offset + hi)))
            block += 1
        return ranges

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of global batch `step`: padded rows and labels, shuffled."""
        ranges = self.cell_ranges(step)
        matrix = sp.vstack(self.store.read_blocks(ranges), format="csr")
        rows = np.concatenate([np.arange(a, b) for a, b in ranges]) - self.start
        epoch, index = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch, index, self.process_index]).permutation(len(rows))
        genes, counts = padded_rows(matrix[order], self._global_width(step))
        labels = {name: codes[rows[order]] for name, codes in self.labels.items()}
        cell = (rows[order] + self.start).astype(np.int32)
        return {"genes": genes, "counts": counts, "cell": cell, **labels}

    def _global_width(self, step: int) -> int:
        """One padded width for every process's slice (global arrays need equal shapes), from
        the in-RAM indptr alone: no process reads another's cells."""
        ranges = [r for p in range(self.process_count) for r in self.cell_ranges(step, p)]
        fullest = max(int(np.diff(self.store.indptr[a:b + 1]).max()) for a, b in ranges)
        return bucket_width(fullest, self.store.n_genes)

    def iterate(self, start_step: int, stop_step: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches for steps [start_step, stop_step), read `prefetch` steps ahead on threads."""
        with concurrent.futures.ThreadPoolExecutor(max(1, self.prefetch)) as pool:
            pending = collections.deque()
            next_step = start_step
            while pending or next_step < stop_step:
                while next_step < stop_step and len(pending) < self.prefetch + 1:
                    pending.append(pool.submit(self.batch, next_step))
                    next_step += 1
                yield pending.popleft().result()


def sequential_batches(store: Store, start: int, stop: int, batch_size: int
                       ) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Rows [start, stop) in store order, as (batch, n_valid) of fixed `batch_size` cells.

    The last batch is padded with empty cells (all-zero counts) so jit sees one batch shape;
    `n_valid` says how many leading cells are real.
    """
    labels = label_codes(store, start, stop)
    for a in range(start, stop, batch_size):
        b = min(a + batch_size, stop)
        matrix = store.read_rows(a, b)
        if b - a < batch_size:
            matrix = sp.vstack([matrix, sp.csr_matrix((batch_size - (b - a), store.n_genes), dtype=matrix.dtype)],
                               format="csr")
        genes, counts = padded_rows(matrix)
        pad = batch_size - (b - a)
        batch = {name: np.pad(codes[a - start:b - start], (0, pad)) for name, codes in labels.items()}
        cell = np.pad(np.arange(a, b, dtype=np.int32), (0, pad))
        yield {"genes": genes, "counts": counts, "cell": cell, **batch}, b - a
