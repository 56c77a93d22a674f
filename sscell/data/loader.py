"""Deterministic, resumable batches of selected cells of a store, prefetched on threads.

A loader reads a *selection*: the rows of one split, optionally only some datasets' cells and
a fraction of them (`select_rows`), held as a sorted array of store rows. The split's rows are
cut into windows of `block_cells` consecutive rows (the store is shuffled at write time, so a
window is a random sample); a block is the selected rows of one window. Each epoch permutes
the blocks, the permuted sequence of cells is cut into global batches, each process reads
only its contiguous slice of a global batch - the runs of consecutive selected rows, all
issued at once - and shuffles it. Rows outside the selection are never read.

The order is a pure function of (seed, epoch, batch index), so the iterator state is just
the global step, exact resume needs no replay, and every selected cell is seen once per epoch
(bar the last partial batch). The loader's host state per cell is its row (int64) and three
label codes (int32): 20 bytes, no Python objects.

Batches are padded sparse rows (`genes`, `counts`: cells x width, width a power of two agreed
by every process, so jit sees few shapes), integer labels and `cell` (each cell's row in the
store); `sscell.data.preprocess` densifies on the device.
"""
from __future__ import annotations

import collections
import concurrent.futures
import functools
from collections.abc import Iterator, Sequence

import numpy as np
import scipy.sparse as sp

from sscell.data.store import Store
from sscell.errors import SscellError

LABEL_COLUMNS = {"cell_type": "cell_type", "donor": "donor_id", "dataset": "dataset_id"}
FRACTION_GRANULE = 64  # a fraction keeps whole 64-row windows of the split (contiguous reads)
_FRACTION_STREAM = 2**40  # rng key of the fraction draw, apart from the (seed, epoch) keys


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
        if column not in store.obs:
            raise SscellError(f"the store has no obs['{column}'] to select datasets from; drop the dataset selection")
        labels = store.obs[column].iloc[start:stop].astype("category")  # codes: no per-cell strings
        codes, names = labels.cat.codes.to_numpy(), np.asarray(labels.cat.categories.astype(str))
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


def bucket_width(fullest: int, n_genes: int) -> int:
    """Padded row width for rows of at most `fullest` nonzeros: a power of two >= 16, at most n_genes."""
    return min(n_genes, max(16, 1 << (max(fullest, 1) - 1).bit_length()))


def padded_rows(matrix: sp.csr_matrix, width: int | None = None,
                order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(genes, counts) of shape (cells, width): each row's nonzeros, zero-padded.

    Genes are uint16 (int32 beyond 65,536 genes) and counts keep the matrix's dtype (the
    store's integer counts): half the bytes of int32/float32 to fill and to ship, and
    `preprocess.densify` casts on the device. Output row i holds matrix row `order[i]`
    (default: row i); `width` defaults to the bucket of the fullest row.
    """
    n = matrix.shape[0]
    nnz_per_row = np.diff(matrix.indptr)
    if width is None:
        width = bucket_width(int(nnz_per_row.max(initial=1)), matrix.shape[1])
    destination = np.arange(n) if order is None else np.argsort(order)  # output row of each matrix row
    flat = np.arange(matrix.nnz) + np.repeat(destination * width - matrix.indptr[:-1], nnz_per_row)
    genes = np.zeros(n * width, np.uint16 if matrix.shape[1] <= 2**16 else np.int32)
    counts = np.zeros(n * width, matrix.dtype)
    genes[flat] = matrix.indices
    counts[flat] = matrix.data
    return genes.reshape(n, width), counts.reshape(n, width)


def runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) ranges of the runs of consecutive values in `rows`, in order."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    firsts, lasts = rows[np.r_[0, breaks]], rows[np.r_[breaks, len(rows)] - 1]
    return [(int(a), int(b) + 1) for a, b in zip(firsts, lasts)] if len(rows) else []


class CellLoader:
    """Batches of the selected cells of one split; `batch(step)` is a pure function of the step.

    `datasets` and `fraction` narrow the split as in `select_rows` (drawn from `seed`).
    """

    def __init__(self, store: Store, split: str, batch_size: int, seed: int, *,
                 datasets: Sequence[str] = (), fraction: float = 1.0, block_cells: int = 64,
                 process_index: int = 0, process_count: int = 1, prefetch: int = 4):
        if batch_size % process_count:
            raise SscellError(f"batch size {batch_size} is not divisible by the {process_count} processes; "
                              "choose a multiple")
        self.store = store
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
        self.prefetch = prefetch
        self.steps_per_epoch = self.n_cells // batch_size
        start, stop = store.split_range(split)
        self.labels = {name: codes[self.rows - start] for name, codes in label_codes(store, start, stop).items()}
        window = (self.rows - start) // block_cells
        # Block b holds self.rows[bounds[b]:bounds[b + 1]], the selected rows of one window.
        self._bounds = np.r_[0, np.flatnonzero(np.diff(window)) + 1, self.n_cells]
        self._epoch_order = functools.lru_cache(maxsize=2)(self._order)

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """This epoch's block order, and where each block begins in the epoch's cell sequence."""
        blocks = np.random.default_rng([self.seed, epoch]).permutation(len(self._bounds) - 1)
        lengths = (self._bounds[1:] - self._bounds[:-1])[blocks]
        return blocks, np.cumsum(lengths) - lengths

    def selection(self, step: int) -> np.ndarray:
        """Indices into `self.rows` of global batch `step`, process slices one after another."""
        epoch, index = divmod(step, self.steps_per_epoch)
        blocks, positions = self._epoch_order(epoch)
        first, last = index * self.batch_size, (index + 1) * self.batch_size
        lo = int(np.searchsorted(positions, first, side="right")) - 1
        hi = int(np.searchsorted(positions, last, side="left"))
        return np.concatenate([
            self._bounds[b] + np.arange(max(first - p, 0), min(last - p, self._bounds[b + 1] - self._bounds[b]))
            for b, p in zip(blocks[lo:hi], positions[lo:hi])])

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of global batch `step`: padded rows and labels, shuffled."""
        selection = self.selection(step)
        indptr = self.store.indptr
        # One padded width for every process's slice (global arrays need equal shapes), from the
        # in-RAM indptr alone: no process reads another's cells.
        fullest = int((indptr[self.rows[selection] + 1] - indptr[self.rows[selection]]).max())
        width = bucket_width(fullest, self.store.n_genes)
        n = self.local_batch_size
        selection = selection[self.process_index * n:(self.process_index + 1) * n]
        rows = self.rows[selection]
        matrix = sp.vstack(self.store.read_blocks(runs(rows)), format="csr")
        epoch, index = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch, index, self.process_index]).permutation(n)
        genes, counts = padded_rows(matrix, width, order)
        labels = {name: codes[selection[order]] for name, codes in self.labels.items()}
        return {"genes": genes, "counts": counts, "cell": rows[order].astype(np.int32), **labels}

    def iterate(self, start_step: int, stop_step: int) -> Iterator[dict[str, np.ndarray]]:
        """Batches for steps [start_step, stop_step), `prefetch` steps read ahead on as many threads."""
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
