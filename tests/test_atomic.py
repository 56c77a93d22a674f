"""sscell.atomic: the target holds the old version or the new one, never a part, and no temporary is left."""
from __future__ import annotations

import pytest

from sscell.atomic import atomic_file, atomic_folder


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "results.md"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]
    with atomic_file(path) as tmp:
        assert tmp.parent == tmp_path  # same folder: the rename is atomic
        tmp.write_text("new")
    assert path.read_text() == "new" and list(tmp_path.iterdir()) == [path]


def test_a_folder_is_swapped_whole_or_not_at_all(tmp_path):
    path = tmp_path / "bundle"
    path.mkdir()
    (path / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(path) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("failed mid-write")
    assert (path / "a").read_text() == "old" and list(tmp_path.iterdir()) == [path]
    with atomic_folder(path) as tmp:
        (tmp / "b").write_text("new")
    assert [p.name for p in path.iterdir()] == ["b"] and list(tmp_path.iterdir()) == [path]
