"""annbatch's part of `python -m benchmarks.bench_loader`, run by a Python >= 3.12 with annbatch.

It reads the sscell store itself (an AnnData zarr v3 store: same cells, codec and chunking)
with annbatch's shuffled chunk loader and prints one JSON object. It imports nothing from
sscell, so it runs in annbatch's own virtual environment:
`python benchmarks/annbatch_worker.py STORE --batch-size 1024 --chunk-sizes 64 512 --cells 50000`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import annbatch
import anndata
import numpy as np
import zarr


def measure(store: str, batch_size: int, chunk_size: int, cells: int) -> float:
    """Cells/s of shuffled batches of `batch_size` cells read in chunks of `chunk_size`."""
    dataset = anndata.io.sparse_dataset(zarr.open_group(store, mode="r")["X"])
    loader = annbatch.Loader(chunk_size=chunk_size, preload_nchunks=max(1, 4 * batch_size // chunk_size),
                             batch_size=batch_size, shuffle=True, drop_last=True, preload_to_gpu=False,
                             rng=np.random.default_rng(0)).add_dataset(dataset)
    batches = iter(loader)
    next(batches)  # opening and the first preload are not steady-state
    seen, start = 0, time.perf_counter()
    for batch in batches:
        seen += batch["X"].shape[0]
        if seen >= cells:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--cells", type=int, default=50_000)
    args = parser.parse_args()
    zarrs = importlib.util.find_spec("zarrs") is not None
    if zarrs:  # annbatch's recommended codec pipeline for local files
        zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
    print(json.dumps({
        "annbatch_version": annbatch.__version__, "zarrs_codec_pipeline": zarrs, "cpu_count": os.cpu_count(),
        "cells_per_s": {str(c): measure(args.store, args.batch_size, c, args.cells) for c in args.chunk_sizes},
    }))


if __name__ == "__main__":
    main()
