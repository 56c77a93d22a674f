"""Converter: out-of-core bucket shuffle, --append, and recovery from a SIGKILL at any point."""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from test_store import dense, input_rows, make_adata

import sscell.data.convert
import sscell.data.store
from sscell.data.convert import convert
from sscell.data.store import SPLITS, open_store
from sscell.errors import SscellError


def same_store(a, b) -> None:
    assert a.read_obs().index.equals(b.read_obs().index)
    pd.testing.assert_frame_equal(a.read_obs(), b.read_obs())
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(dense(a.read_rows(0, a.n_cells)), dense(b.read_rows(0, b.n_cells)))


def test_bucket_size_changes_nothing_but_memory(tmp_path, monkeypatch):
    inputs = []
    for k in range(3):
        adata = make_adata(n_cells=150 + 50 * k, seed=k, prefix=f"i{k}-")
        adata.write_h5ad(tmp_path / f"in{k}.h5ad")
        inputs.append(adata)
    paths = [tmp_path / f"in{k}.h5ad" for k in range(3)]
    convert(paths, tmp_path / "one_bucket", seed=5)
    monkeypatch.setattr(sscell.data.store, "ID_CHUNK", 16)  # cell ids written in many pieces
    convert(paths, tmp_path / "many_buckets", seed=5, block_cells=7, bucket_nonzeros=100)  # ~ 8 cells a bucket
    one, many = open_store(tmp_path / "one_bucket"), open_store(tmp_path / "many_buckets")

    same_store(one, many)
    both = ad.concat(inputs)
    np.testing.assert_array_equal(dense(many.read_rows(0, many.n_cells)), dense(both.X[input_rows(many, both)]))
    assert sorted(os.listdir(tmp_path)) == ["in0.h5ad", "in1.h5ad", "in2.h5ad", "many_buckets", "one_bucket"]


def test_scratch_is_compressed_and_shrinks_while_the_store_grows(tmp_path, monkeypatch):
    """The bucket pass's scratch holds the counts compressed, and each bucket's file is gone once
    its cells are in the store: the peak disk is about the larger of scratch and store, not their sum."""
    adata = make_adata(n_cells=2000, n_genes=300, n_donors=10, seed=4)
    adata.write_h5ad(tmp_path / "in.h5ad")
    scratch_bytes = []
    append_bucket = sscell.data.convert._append_bucket

    def watched(writer, part, lo, hi, *args):  # the real write, with the scratch measured before each bucket
        scratch = next(tmp_path.glob(".store.tmp-*")) / "buckets"
        scratch_bytes.append(sum(f.stat().st_size for f in scratch.iterdir()))
        append_bucket(writer, part, lo, hi, *args)

    monkeypatch.setattr(sscell.data.convert, "_append_bucket", watched)
    convert([tmp_path / "in.h5ad"], tmp_path / "store", seed=0, bucket_nonzeros=5000)
    store = open_store(tmp_path / "store")
    uncompressed = store.indptr[-1] * (store.data_dtype.itemsize + 2) + store.n_cells * 8  # uint16 genes, ids, rows
    assert len(scratch_bytes) > 5 and scratch_bytes[-1] == 0
    assert all(a > b for a, b in itertools.pairwise(scratch_bytes))  # a bucket's file leaves with its cells
    assert scratch_bytes[0] < 0.6 * uncompressed
    np.testing.assert_array_equal(dense(store.read_rows(0, store.n_cells)),
                                  dense(adata.X[input_rows(store, adata)]))


def test_append_keeps_splits_of_known_units(tmp_path):
    old = make_adata(n_cells=300, n_donors=12, seed=0, prefix="old-")
    old.obs["dataset_id"] = "atlas"
    new = make_adata(n_cells=200, n_genes=45, n_donors=20, seed=1, prefix="new-")  # donors 12-19 are new units
    new.obs["dataset_id"] = "atlas"
    other = make_adata(n_cells=100, n_genes=30, n_donors=6, seed=2, prefix="other-")
    old.write_h5ad(tmp_path / "old.h5ad")
    new.write_h5ad(tmp_path / "new.h5ad")
    other.write_h5ad(tmp_path / "other.h5ad")
    (tmp_path / "genes.txt").write_text("\n".join(old.var_names))
    convert([tmp_path / "old.h5ad"], tmp_path / "store", seed=1, vocabulary=tmp_path / "genes.txt")
    before = open_store(tmp_path / "store")
    before_obs = before.read_obs()  # read now: the append replaces the store on disk

    report = convert([tmp_path / "new.h5ad", tmp_path / "other.h5ad"], tmp_path / "store", append=True, seed=2,
                     block_cells=64, bucket_nonzeros=500)
    after = open_store(tmp_path / "store")

    assert report["appended_cells"] == 300 and report["cells"] == after.n_cells == 600
    assert report["genes_dropped"] == {str(tmp_path / "new.h5ad"): 5, str(tmp_path / "other.h5ad"): 0}
    assert after.var.index.equals(before.var.index) and report["genes_added"] == 0  # a fixed vocabulary stays
    split_before = before_obs["split"].astype(str)
    split_after = after.read_obs()["split"].astype(str)
    assert (split_after[before_obs.index] == split_before).all()  # old cells keep their split
    unit_split = dict(zip(before_obs["donor_id"].astype(str), split_before))
    known = new.obs["donor_id"].isin(unit_split)
    assert known.any() and (~known).any()
    assert [unit_split[d] for d in new.obs["donor_id"][known]] == list(split_after[new.obs_names[known]])
    assert (after.read_obs().groupby(["dataset_id", "donor_id"], observed=True)["split"].nunique() == 1).all()
    fresh = new.obs_names[~known].append(other.obs_names)
    assert set(split_after[fresh]) == set(SPLITS)  # new units are split afresh, among themselves
    for s in SPLITS:
        assert (after.read_obs()["split"].iloc[slice(*after.split_range(s))] == s).all()
    everything = ad.concat([old, new[:, old.var_names], other], join="outer", fill_value=0)[:, old.var_names]
    np.testing.assert_array_equal(dense(after.read_rows(0, 600)), dense(everything.X[input_rows(after, everything)]))
    assert after.datasets == ["atlas", "other"]
    np.testing.assert_array_equal(after.measured[0], True)  # old and new measure every store gene
    np.testing.assert_array_equal(after.measured[1], after.var.index.isin(other.var_names))

    again = convert([tmp_path / "new.h5ad"], tmp_path / "store", append=True)  # a rerun: nothing to add
    assert again["skipped"] == [str(tmp_path / "new.h5ad")] and again["appended_cells"] == 0
    same_store(after, open_store(tmp_path / "store"))
    with pytest.raises(SscellError, match="does not exist; drop --append"):
        convert([tmp_path / "new.h5ad"], tmp_path / "nowhere", append=True)


def start_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sscell.data.convert", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(process: subprocess.Popen, appeared: Path, timeout: float = 60) -> bool:
    """SIGKILL `process` as soon as `appeared` exists; False if it finished first."""
    deadline = time.monotonic() + timeout
    while not appeared.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.0005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return True


def build_dir(output: Path, pid: int) -> Path:
    return output.parent / f".{output.name}.tmp-{pid}"


@pytest.mark.slow
def test_sigkill_at_any_point_then_rerun_finishes(tmp_path):  # multi-process, ~15 s
    """Kill conversions at their start, in the bucket pass and while writing shards; each leaves
    nothing `open_store` accepts, and a plain rerun produces the uninterrupted run's store."""
    adata = make_adata(n_cells=3000, n_genes=200, n_donors=30, seed=3)
    adata.write_h5ad(tmp_path / "in.h5ad")
    convert([tmp_path / "in.h5ad"], tmp_path / "reference", seed=0)
    output = tmp_path / "store"
    args = [f"--output={output}", str(tmp_path / "in.h5ad"), "--block-cells=16", "--bucket-nonzeros=8000"]
    points = [lambda d: d, lambda d: d / "buckets" / "0", lambda d: d / "store" / "X" / "data" / "c"]
    killed = 0
    for point in points:
        process = start_cli(*args)
        killed += kill_when(process, point(build_dir(output, process.pid)))
        assert not output.exists()
        for leftover in output.parent.glob(".store.tmp-*"):
            with pytest.raises(SscellError, match="not an sscell store"):
                open_store(leftover / "store")
    assert killed >= 2  # timing may let a tiny phase slip by, not most of them

    finish = subprocess.run([sys.executable, "-m", "sscell.data.convert", *args], capture_output=True, text=True,
                            check=False)
    assert finish.returncode == 0, finish.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad", "reference", "store"]
    same_store(open_store(tmp_path / "reference"), open_store(output))


def test_append_killed_between_renames_restores_the_store(tmp_path):
    """The one window where STORE is absent: the next run puts the previous store back."""
    make_adata(n_cells=100, seed=0, prefix="a").write_h5ad(tmp_path / "a.h5ad")
    make_adata(n_cells=100, seed=1, prefix="b").write_h5ad(tmp_path / "b.h5ad")
    output = tmp_path / "store"
    convert([tmp_path / "a.h5ad"], output)
    before = open_store(output).read_obs()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, check=False,
                          text=True).stdout.strip()  # a pid that no longer runs
    stale = build_dir(output, int(dead))
    stale.mkdir()
    os.rename(output, stale / "old")  # the state after the first of the two renames
    (stale / "store").mkdir()

    report = convert([tmp_path / "b.h5ad"], output, append=True)
    assert report["cells"] == 200 and not stale.exists()
    after = open_store(output)
    assert after.read_obs().index.isin(before.index).sum() == 100
