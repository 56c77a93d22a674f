"""Cell ids out of core: 64-bit hashes (8 bytes a cell) find duplicates, the ids themselves settle them.

The converter never holds every cell id in memory: sources hand out ids in row blocks
(`read_ids(start, stop)`, an object array of UTF-8 bytes), each block is hashed, and only a hash
seen twice leads back to the ids, which are compared exactly (a hash collision is not a duplicate).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from sscell.errors import SscellError


class IdSource(Protocol):
    """Anything holding cells with ids: an input file or an existing store."""

    path: Path

    @property
    def n_cells(self) -> int: ...

    def read_ids(self, start: int, stop: int) -> np.ndarray: ...


def as_utf8(values: np.ndarray) -> np.ndarray:
    """Cell ids (str, bytes or numbers) as an object array of UTF-8 bytes."""
    values = np.asarray(values)
    if values.dtype.kind == "S":
        return values.astype(object)
    return np.array([v if isinstance(v, bytes) else str(v).encode() for v in values.tolist()], dtype=object)


def _hash(ids: np.ndarray) -> np.ndarray:
    """64-bit hashes (uint64) of UTF-8 ids."""
    return pd.util.hash_array(ids, categorize=False)


def _blocks(src: IdSource, block_cells: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first row, ids, hashes) of `src` in row blocks."""
    for start in range(0, src.n_cells, block_cells):
        ids = src.read_ids(start, min(start + block_cells, src.n_cells))
        yield start, ids, _hash(ids)


def sorted_hashes(sources: Sequence[IdSource], block_cells: int) -> tuple[np.ndarray, int]:
    """The sorted hashes of every cell id of `sources`, and the longest id's length in bytes."""
    hashes = np.empty(sum(src.n_cells for src in sources), np.uint64)
    offset, longest = 0, 1
    for src in sources:
        for _, ids, block in _blocks(src, block_cells):
            hashes[offset:offset + len(block)] = block
            offset += len(block)
            longest = max(longest, max(map(len, ids), default=0))
    hashes.sort()
    return hashes, longest


def all_in(src: IdSource, hashes: np.ndarray, block_cells: int) -> bool:
    """Whether every cell id of `src` hashes into `hashes` (sorted): its cells are already there."""
    for _, _, block in _blocks(src, block_cells):
        at = np.minimum(np.searchsorted(hashes, block), len(hashes) - 1)
        if len(hashes) == 0 or (hashes[at] != block).any():
            return False
    return True


def _occurrences(sources: Sequence[IdSource], cell: bytes, block_cells: int) -> list[tuple[int, int]]:
    """(source number, row) of every occurrence of `cell`, in order."""
    target = _hash(np.array([cell], dtype=object))[0]
    return [(k, start + int(i)) for k, src in enumerate(sources) for start, ids, block in _blocks(src, block_cells)
            for i in np.flatnonzero(block == target) if ids[i] == cell]


def check_unique(sources: Sequence[IdSource], block_cells: int) -> int:
    """Raise SscellError naming the first repeated cell id (in source order) and the sources holding
    it, if any; return the longest id's length in bytes. Memory: at most 9 bytes a cell."""
    hashes, longest = sorted_hashes(sources, block_cells)
    repeated = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
    del hashes
    seen = np.zeros(len(repeated), bool)
    for k, src in enumerate(sources if len(repeated) else ()):
        for start, ids, block in _blocks(src, block_cells):
            at = np.minimum(np.searchsorted(repeated, block), len(repeated) - 1)
            candidates = np.flatnonzero(repeated[at] == block)
            _, first = np.unique(at[candidates], return_index=True)
            again = seen[at[candidates]]
            again[np.setdiff1d(np.arange(len(candidates)), first)] = True
            for i in candidates[again]:  # its hash was seen before: a repeated id unless hashes collide
                where = _occurrences(sources, ids[i], block_cells)
                if where[0] < (k, start + i):
                    holders = ", ".join(dict.fromkeys(str(sources[j].path) for j, _ in where))
                    raise SscellError(f"cell id {ids[i].decode()!r} appears more than once (in {holders}); "
                                      "cell ids must be unique")
            seen[at[candidates]] = True
    return longest
