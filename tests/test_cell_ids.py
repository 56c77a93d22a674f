"""Out-of-core cell-id checks (sscell.data.cell_ids): duplicates found from hashes, settled exactly."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from sscell.data import cell_ids
from sscell.errors import SscellError


@dataclasses.dataclass
class Ids:
    """An in-memory IdSource."""

    path: Path
    values: list[str]

    @property
    def n_cells(self) -> int:
        return len(self.values)

    def read_ids(self, start: int, stop: int) -> np.ndarray:
        return cell_ids.as_utf8(np.array(self.values[start:stop], dtype=object))


def first_repeat(values: list[str]) -> str | None:
    """The reference: the id of the earliest position whose id appeared before (pandas' duplicated())."""
    seen = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return None


@pytest.fixture(params=["siphash", "by length"])
def hashing(request, monkeypatch):
    """The real hash, and one where every two ids of the same length collide, so that
    the exact recheck of hash collisions is what decides."""
    if request.param == "by length":
        monkeypatch.setattr(cell_ids, "_hash", lambda ids: np.array([len(i) for i in ids], np.uint64))


def test_unique_ids_pass_and_longest_is_reported(hashing):
    sources = [Ids(Path("a.h5ad"), [f"cell{i}" for i in range(50)]), Ids(Path("b.h5ad"), ["x", "é" * 7, "yy"])]
    assert cell_ids.check_unique(sources, block_cells=8) == 14  # "é" is two bytes in UTF-8


@pytest.mark.parametrize("seed", range(4))
def test_first_repeated_id_and_its_holders(hashing, seed):
    rng = np.random.default_rng(seed)
    pool = [f"c{i}" for i in range(40)]
    parts = [list(rng.choice(pool, size, replace=False)) for size in (15, 20, 12)]
    sources = [Ids(Path(f"in{k}.h5ad"), part) for k, part in enumerate(parts)]
    everything = [v for part in parts for v in part]
    expected = first_repeat(everything)
    assert expected is not None  # 47 draws from 40 ids
    holders = ", ".join(f"in{k}.h5ad" for k, part in enumerate(parts) if expected in part)
    with pytest.raises(SscellError, match=rf"^cell id '{expected}' appears more than once \(in {holders}\)"):
        cell_ids.check_unique(sources, block_cells=6)


def test_repeat_within_one_file(hashing):
    with pytest.raises(SscellError, match=r"'b' appears more than once \(in one.h5ad\)"):
        cell_ids.check_unique([Ids(Path("one.h5ad"), ["a", "b", "c", "b", "a"])], block_cells=2)


def test_all_in(hashing):
    hashes, _ = cell_ids.sorted_hashes([Ids(Path("store"), [f"c{i}" for i in range(30)])], block_cells=7)
    assert cell_ids.all_in(Ids(Path("a"), ["c3", "c29", "c0"]), hashes, block_cells=2)
    assert not cell_ids.all_in(Ids(Path("b"), ["c3", "new-cell"]), hashes, block_cells=2)
