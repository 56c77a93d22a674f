"""X's compressor and chunk size are conversion choices (`convert --codec`, `--chunk-cells`): a
zstd store, or one of larger chunks, holds the same cells as the default one, records the choice,
and its arrays are laid out that way on disk; an append keeps them."""
import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_store import make_adata

from sscell.data.convert import convert, main
from sscell.data.store import CELLS_PER_CHUNK, inner_chunk_elements, open_store


def inner_chunk_shape(store_path: Path, array: str = "data") -> int:
    metadata = json.loads((Path(store_path) / "X" / array / "zarr.json").read_text())
    return metadata["codecs"][0]["configuration"]["chunk_shape"][0]


def assert_same_cells(a, b):
    np.testing.assert_array_equal(a.indptr, b.indptr)
    x, y = a.read_rows(0, a.n_cells), b.read_rows(0, b.n_cells)
    assert x.dtype == y.dtype and (x != y).nnz == 0


def test_a_zstd_store_reads_as_the_lz4_store(tiny_h5ad, tiny_store, tmp_path):
    convert([tiny_h5ad], tmp_path / "zstd", seed=0, codec="zstd")
    store = open_store(tmp_path / "zstd")
    assert zarr.open_group(tmp_path / "zstd", mode="r").attrs["sscell"]["codec"] == "zstd"
    assert zarr.open_group(tiny_store.path, mode="r").attrs["sscell"]["codec"] == "lz4"
    codecs = json.loads((Path(tmp_path) / "zstd" / "X" / "data" / "zarr.json").read_text())["codecs"]
    assert codecs[0]["configuration"]["codecs"][1]["configuration"]["cname"] == "zstd"
    assert_same_cells(store, tiny_store)


def test_an_unknown_codec_is_refused(tiny_h5ad, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([tiny_h5ad, f"--output={tmp_path / 'store'}", "--codec=gzip"])
    assert exit_info.value.code == 2 and "invalid choice: 'gzip'" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("nonzeros_per_cell", [3, 500, 2_000, 10**6])
def test_inner_chunks_hold_about_chunk_cells_cells_as_a_power_of_two(nonzeros_per_cell):
    for chunk_cells in (8, 32, 128):
        elements = inner_chunk_elements(nonzeros_per_cell * 1000, 1000, chunk_cells)
        assert elements & (elements - 1) == 0 and 2**12 <= elements <= 2**20
        if 2**12 < chunk_cells * nonzeros_per_cell < 2**20:
            assert 2**-0.5 <= elements / (chunk_cells * nonzeros_per_cell) <= 2**0.5


def test_chunk_cells_sets_x_inner_chunks_and_an_append_keeps_them(tiny_h5ad, tiny_store, tmp_path):
    convert([tiny_h5ad], tmp_path / "store", seed=0, chunk_cells=1024)
    store = open_store(tmp_path / "store")
    assert zarr.open_group(tmp_path / "store", mode="r").attrs["sscell"]["chunk_cells"] == 1024
    assert zarr.open_group(tiny_store.path, mode="r").attrs["sscell"]["chunk_cells"] == CELLS_PER_CHUNK
    expected = inner_chunk_elements(int(store.indptr[-1]), store.n_cells, 1024)
    assert inner_chunk_shape(store.path) == inner_chunk_shape(store.path, "indices") == expected
    assert expected > inner_chunk_shape(tiny_store.path)
    assert_same_cells(store, tiny_store)


def test_an_append_keeps_the_stores_chunk_cells(tmp_path):
    for name, seed in (("old", 0), ("new", 1)):
        make_adata(n_cells=300, n_genes=400, seed=seed, prefix=name).write_h5ad(tmp_path / f"{name}.h5ad")
    convert([tmp_path / "old.h5ad"], tmp_path / "store", seed=0, chunk_cells=512)
    convert([tmp_path / "new.h5ad"], tmp_path / "store", append=True)
    grown = open_store(tmp_path / "store")
    assert grown.n_cells == 600
    assert zarr.open_group(tmp_path / "store", mode="r").attrs["sscell"]["chunk_cells"] == 512
    assert inner_chunk_shape(grown.path) == inner_chunk_elements(int(grown.indptr[-1]), grown.n_cells, 512) > 2**12


def test_chunk_cells_below_one_is_refused_before_writing(tiny_h5ad, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([tiny_h5ad, f"--output={tmp_path / 'store'}", "--chunk-cells=0"])
    assert exit_info.value.code != 0 and "chunk_cells (0) must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "store").exists() and not list(tmp_path.glob(".store.tmp-*"))
