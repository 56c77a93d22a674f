"""X's compressor is a conversion choice (`convert --codec`): a zstd store holds the same cells
as the default lz4 one, records its codec, and its arrays are zstd-compressed on disk."""
import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from sscell.data.convert import convert, main
from sscell.data.store import open_store


def test_a_zstd_store_reads_as_the_lz4_store(tiny_h5ad, tiny_store, tmp_path):
    convert([tiny_h5ad], tmp_path / "zstd", seed=0, codec="zstd")
    store = open_store(tmp_path / "zstd")
    assert zarr.open_group(tmp_path / "zstd", mode="r").attrs["sscell"]["codec"] == "zstd"
    assert zarr.open_group(tiny_store.path, mode="r").attrs["sscell"]["codec"] == "lz4"
    codecs = json.loads((Path(tmp_path) / "zstd" / "X" / "data" / "zarr.json").read_text())["codecs"]
    assert codecs[0]["configuration"]["codecs"][1]["configuration"]["cname"] == "zstd"
    np.testing.assert_array_equal(store.indptr, tiny_store.indptr)
    a, b = store.read_rows(0, store.n_cells), tiny_store.read_rows(0, tiny_store.n_cells)
    assert a.dtype == b.dtype and (a != b).nnz == 0


def test_an_unknown_codec_is_refused(tiny_h5ad, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([tiny_h5ad, f"--output={tmp_path / 'store'}", "--codec=gzip"])
    assert exit_info.value.code == 2 and "invalid choice: 'gzip'" in capsys.readouterr().err
    assert not (tmp_path / "store").exists()
