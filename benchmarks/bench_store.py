"""Store benchmark: conversion speed and memory, store size, random-block reads; prints JSON per size.

For each `--cells` size: a synthetic atlas (`python -m sscell.data.synthetic`, `--genes` genes)
is converted by `python -X tracemalloc -m sscell.data.convert` in its own process, so its peak
RSS is that run's alone and its traced peak counts every numpy array and Python object; then this process reads random 64-cell blocks from the store and, for comparison
in the same run, from the source .h5ad (anndata's backed CSR reader), both with a warm page cache.

    python -m benchmarks.bench_store                                  # 100 k and 1 M cells x 2,000 genes
    python -m benchmarks.bench_store --cells 100000 --genes 19331     # the study's vocabulary width
    python -m benchmarks.bench_store --cells 100000 --workdir=/tmp/b  # keep (and reuse) the atlases

Figures: `convert_cells_per_s`, `convert_peak_rss_gb` (and per cell), `convert_traced_peak_gb`;
with several sizes, a last line gives the growth per cell between the smallest and the largest
size of the traced peak (`convert_traced_bytes_per_extra_cell`: the converter's per-cell state,
flat memory means a few tens of bytes) and of peak RSS (`convert_rss_bytes_per_extra_cell`,
which also holds the allocator's and tensorstore's writer buffers growing to their steady size
over the first few shards, ~0.6 M cells at 2,000 genes); `store_bytes_per_cell` vs
`h5ad_bytes_per_cell` (as the generator writes it: float32 counts, int32 indices, no compression);
`store_read_cells_per_s` vs `h5ad_read_cells_per_s` for `--read-cells` cells in random
`--block-cells`-cell blocks, `--blocks-in-flight` reads issued together as the loader does.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata
import h5py
import numpy as np

from sscell.data.store import open_store
from sscell.errors import exit_on_error


def run_module(*args: str, tracemalloc: bool = False) -> str:
    """stdout of `python -m ARGS` in a fresh process (with Python's memory tracing on, if asked)."""
    python = [sys.executable, "-X", "tracemalloc"] if tracemalloc else [sys.executable]
    done = subprocess.run([*python, "-m", *args], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"python -m {' '.join(args)} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout


def block_starts(n_cells: int, block_cells: int, read_cells: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_cells - block_cells + 1, max(1, read_cells // block_cells))


def store_read_rate(store_path: Path, block_cells: int, read_cells: int, in_flight: int) -> float:
    store = open_store(store_path)
    starts = block_starts(store.n_cells, block_cells, read_cells)
    store.read_blocks([(int(s), int(s) + block_cells) for s in starts[:in_flight]])  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(starts), in_flight):
        store.read_blocks([(int(s), int(s) + block_cells) for s in starts[i:i + in_flight]])
    return len(starts) * block_cells / (time.perf_counter() - t0)


def h5ad_read_rate(h5ad: Path, block_cells: int, read_cells: int) -> float:
    with h5py.File(h5ad, "r") as f:
        counts = anndata.io.sparse_dataset(f["X"])
        starts = block_starts(counts.shape[0], block_cells, read_cells)
        counts[int(starts[0]):int(starts[0]) + block_cells]  # warm-up
        t0 = time.perf_counter()
        for s in starts:
            counts[int(s):int(s) + block_cells]
        return len(starts) * block_cells / (time.perf_counter() - t0)


def measure(workdir: Path, cells: int, genes: int, args: argparse.Namespace) -> dict:
    h5ad, store = workdir / f"atlas_{cells}x{genes}.h5ad", workdir / f"store_{cells}x{genes}"
    if not h5ad.exists():
        run_module("sscell.data.synthetic", f"--output={h5ad}", f"--cells={cells}", f"--genes={genes}")
    shutil.rmtree(store, ignore_errors=True)
    report = json.loads(run_module("sscell.data.convert", f"--output={store}", str(h5ad), tracemalloc=True))
    for path in (h5ad, *store.rglob("*")):  # warm the page cache for both readers alike
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass
    store_rate = store_read_rate(store, args.block_cells, args.read_cells, args.blocks_in_flight)
    h5ad_rate = h5ad_read_rate(h5ad, args.block_cells, args.read_cells)
    h5ad_bytes = h5ad.stat().st_size / cells
    return {
        "cells": cells, "genes": genes, "nonzeros_per_cell": round(report["nonzeros"] / cells, 1),
        "convert_cells_per_s": round(report["cells_per_s"]),
        "convert_peak_rss_gb": round(report["peak_rss_bytes"] / 2**30, 3),
        "convert_peak_rss_bytes_per_cell": round(report["peak_rss_bytes"] / cells, 1),
        "convert_traced_peak_gb": round(report["traced_peak_bytes"] / 2**30, 3),
        "convert_traced_peak_bytes_per_cell": round(report["traced_peak_bytes"] / cells, 1),
        "store_bytes_per_cell": round(report["bytes_per_cell"], 1), "h5ad_bytes_per_cell": round(h5ad_bytes, 1),
        "store_vs_h5ad_bytes": round(report["bytes_per_cell"] / h5ad_bytes, 3),
        "store_read_cells_per_s": round(store_rate), "h5ad_read_cells_per_s": round(h5ad_rate),
        "store_vs_h5ad_read": round(store_rate / h5ad_rate, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--workdir", help="where atlases and stores go (default: a temporary directory)")
    parser.add_argument("--block-cells", type=int, default=64)
    parser.add_argument("--blocks-in-flight", type=int, default=16)
    parser.add_argument("--read-cells", type=int, default=200_000)
    args = parser.parse_args()
    with exit_on_error(), tempfile.TemporaryDirectory() as scratch:
        workdir = Path(args.workdir or scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        figures = []
        for cells in sorted(args.cells):
            figures.append(measure(workdir, cells, args.genes, args))
            print(json.dumps(figures[-1]), flush=True)
        if len(figures) > 1:
            small, large = figures[0], figures[-1]

            def growth(figure: str) -> float:
                extra = large[figure] * large["cells"] - small[figure] * small["cells"]
                return round(extra / (large["cells"] - small["cells"]), 1)

            print(json.dumps({"genes": args.genes, "cells": [small["cells"], large["cells"]],
                              "convert_traced_bytes_per_extra_cell": growth("convert_traced_peak_bytes_per_cell"),
                              "convert_rss_bytes_per_extra_cell": growth("convert_peak_rss_bytes_per_cell")}))


if __name__ == "__main__":
    main()
