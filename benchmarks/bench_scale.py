"""Atlas-scale benchmark: stores of millions of cells built, read cold and warm, trained from and
evaluated against, with the cost curves; prints one JSON object (docs/scale.md).

    python -m benchmarks.bench_scale --workdir=runs/scale --sizes 1000000 3000000
    python -m benchmarks.bench_scale --sizes 4000 --genes 300 --pool-cells 1024 ...   # seconds (the test)

Stores (`--sizes` cells x `--genes` genes, 1,500-2,500 nonzeros a cell) are written by streaming a
generator straight into sscell's `StoreWriter` (the converter's write pass: the same layout,
codec, chunking and sharding), never holding an atlas in memory or on disk as one .h5ad: peak
disk is the store itself (printed). The generator draws a pool of `--pool-cells` distinct cells
(sorted distinct genes skewed towards low indices, counts ~65% ones with a long tail) and lays
out the store as 256-cell runs copied from random places of the pool, each with its own gene
shift: a compressed chunk (~32 cells) never sees a cell twice, so bytes per cell and decode cost
are those of distinct cells, at memory-copy speed. The real converter (`convert()`: id check,
count pass, split, out-of-core shuffle) runs on the same generator for `--convert-sizes`, its
scratch space (the uncompressed counts once) beside the store.

Per size: build cells/s, peak RSS and store bytes a cell; the loader's cells/s at 1 and 2
threads (a fresh process pinned to that many cores) with a cold page cache (the kernel's caches
dropped before each round where this process may, else posix_fadvise(DONTNEED) on the store's
files; `cache_drop` says which) and warm (the same steps again), next to the raw
read-and-decode of the same rows and the disk's own random-read rate for the requests those
rows make (the compressed inner chunks they touch, read with os.pread on as many threads as the
loader keeps reads in flight, cold); bytes the disk delivered a cell (/proc/self/io).
On the largest store: the study's model trained at batch `--batch-size` fed by the streamed
loader from a cold cache vs one in-memory batch (steps/s, the share of step time spent waiting
for data); device-resident packing (seconds and bytes a million cells). kNN with `--knn-refs`
reference and `--knn-queries` query cells of 64-d clustered embeddings: time and peak RSS of the
exact and approximate (faiss IVF, re-ranked exactly) searches, each in its own process, and their agreement
(neighbour recall, kNN label agreement). A store in a bucket: the smallest store copied to a
local S3 server (moto, as the tests use) and read by the loader (local: no network latency).
`--plot PNG` draws the curves from the JSON (`--from-json`).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse

from sscell.allocator import retain_freed_memory
from sscell.data.store import CELLS_PER_CHUNK, SPLITS, StoreWriter, open_store, runs
from sscell.errors import SscellError, exit_on_error

STUDY_GENES = 19_331
MIN_NONZEROS, MAX_NONZEROS = 1_500, 2_500
RUN_CELLS = 256    # cells copied from one place of the pool
MAX_SHIFT = 64     # genes a run is shifted by (the pool draws genes below n_genes - MAX_SHIFT)
BLOCK_RUNS = 32    # runs appended to the writer at a time (8,192 cells)
CELL_TYPES, DATASETS, DONORS = 20, 8, 64
TRAIN_PREFETCH = 4  # batches the training run reads ahead (data.prefetch's default)


# ---------------------------------------------------------------- the generator


def _pool(n_cells: int, n_genes: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, genes uint16/uint32, counts uint16) of `n_cells` distinct cells: each draws k in
    [MIN_NONZEROS, MAX_NONZEROS] distinct sorted genes of [0, n_genes - MAX_SHIFT), skewed
    towards low indices (gene i of the cell's k sits at floor((G - k) u_i^2) + i for sorted
    uniforms u: the first genes are detected in most cells, most in 5-20%), and counts
    1 + floor(E * 6 (1 - u)^8) (E exponential: ~65% ones, higher for the frequent genes)."""
    rng = np.random.default_rng([seed, 1])
    span = n_genes - MAX_SHIFT
    k = rng.integers(min(MIN_NONZEROS, span // 2), min(MAX_NONZEROS, span // 2) + 1, n_cells)
    indptr = np.r_[0, np.cumsum(k)]
    genes = np.empty(indptr[-1], np.uint16 if n_genes <= 2**16 else np.uint32)
    counts = np.empty(indptr[-1], np.uint16)
    for a in range(0, n_cells, 4096):  # sorted uniforms per cell from exponential spacings
        kb = k[a:a + 4096]
        e = np.cumsum(rng.standard_exponential(int(kb.sum()) + len(kb)))
        ends = np.cumsum(kb + 1) - 1
        base = np.r_[0.0, e[ends[:-1]]]
        cell = np.repeat(np.arange(len(kb)), kb)
        keep = np.ones(len(e), bool)
        keep[ends] = False
        u = (e[keep] - base[cell]) / (e[ends] - base)[cell]
        position = np.arange(len(u)) - np.repeat(np.cumsum(kb) - kb, kb)
        lo, hi = indptr[a], indptr[a + len(kb)]
        genes[lo:hi] = np.floor((span - kb[cell]) * u * u).astype(np.int64) + position
        scale = (6 * (1 - u) ** 8).astype(np.float32)
        counts[lo:hi] = 1 + np.floor(rng.standard_exponential(len(u), dtype=np.float32) * scale)
    return indptr, genes, counts


class ScaleAtlas:
    """`n_cells` x `n_genes` cells from a seed, generated a block of runs at a time (module docstring)."""

    def __init__(self, n_cells: int, n_genes: int = STUDY_GENES, seed: int = 0, pool_cells: int = 32_768):
        self.n_cells, self.n_genes, self.seed = n_cells, n_genes, seed
        pool_cells = max(pool_cells, RUN_CELLS)
        self.pool_indptr, self.pool_genes, self.pool_counts = _pool(pool_cells, n_genes, seed)
        rng = np.random.default_rng([seed, 2])
        n_runs = -(-n_cells // RUN_CELLS)
        self.run_start = rng.integers(0, pool_cells - RUN_CELLS + 1, n_runs)
        self.run_shift = rng.integers(0, MAX_SHIFT, n_runs).astype(self.pool_genes.dtype)
        run_cells = np.minimum(RUN_CELLS, n_cells - RUN_CELLS * np.arange(n_runs))  # the last run may be short
        self.nonzeros = int((self.pool_indptr[self.run_start + run_cells] - self.pool_indptr[self.run_start]).sum())
        codes = np.random.default_rng([seed, 3])
        self.obs_codes = {"cell_type": codes.integers(0, CELL_TYPES, n_cells).astype(np.int8),
                          "dataset_id": codes.integers(0, DATASETS, n_cells).astype(np.int8)}
        self.obs_codes["donor_id"] = (self.obs_codes["dataset_id"] * (DONORS // DATASETS)
                                      + codes.integers(0, DONORS // DATASETS, n_cells)).astype(np.int8)

    def rows(self, start: int, stop: int) -> scipy.sparse.csr_matrix:
        """Cells [start, stop) as csr (sorted gene indices, uint16 counts)."""
        first, last = start // RUN_CELLS, -(-stop // RUN_CELLS)
        genes, counts, lengths = [], [], []
        for r in range(first, last):
            a = max(start, r * RUN_CELLS) - r * RUN_CELLS + self.run_start[r]
            b = min(stop, (r + 1) * RUN_CELLS) - r * RUN_CELLS + self.run_start[r]
            lo, hi = self.pool_indptr[a], self.pool_indptr[b]
            genes.append(self.pool_genes[lo:hi] + self.run_shift[r])
            counts.append(self.pool_counts[lo:hi])
            lengths.append(np.diff(self.pool_indptr[a:b + 1]))
        return scipy.sparse.csr_matrix((np.concatenate(counts), np.concatenate(genes),
                                        np.r_[0, np.cumsum(np.concatenate(lengths))]), shape=(stop - start, self.n_genes))

    def ids(self, start: int, stop: int) -> np.ndarray:
        return np.char.add("cell", np.arange(start, stop).astype(str))

    def obs(self, split: np.ndarray) -> pd.DataFrame:
        """obs of the cells in order (categoricals), with `split` codes (grouped: the store's layout)."""
        names = {"cell_type": [f"type_{i}" for i in range(CELL_TYPES)],
                 "dataset_id": [f"dataset_{i}" for i in range(DATASETS)],
                 "donor_id": [f"donor_{i}" for i in range(DONORS)]}
        return pd.DataFrame({**{c: pd.Categorical.from_codes(self.obs_codes[c], names[c]) for c in names},
                             "split": pd.Categorical.from_codes(split, SPLITS)})

    @property
    def var(self) -> pd.DataFrame:
        return pd.DataFrame(index=pd.Index([f"ENSG{i:011d}" for i in range(self.n_genes)], name="gene_id"))


# ---------------------------------------------------------------- building stores


class _DiskWatch:
    """The most disk space taken under a path's filesystem since start (free space sampled every 0.5 s)."""

    def __init__(self, path: Path):
        self.path, self.start_free, self.least_free = path, shutil.disk_usage(path).free, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            free = shutil.disk_usage(self.path).free
            self.least_free = free if self.least_free is None else min(self.least_free, free)

    def __enter__(self) -> _DiskWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        free = shutil.disk_usage(self.path).free
        self.least_free = free if self.least_free is None else min(self.least_free, free)

    @property
    def peak_bytes(self) -> int:
        return self.start_free - self.least_free


def _peak_rss() -> int:
    """This process's peak RSS in bytes (Linux VmHWM)."""
    status = Path("/proc/self/status").read_text().split("VmHWM:")[1]
    return int(status.split()[0]) * 1024


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def write_store(path: Path, atlas: ScaleAtlas, codec: str = "lz4") -> None:
    """The atlas streamed into a new store at `path`: split 70/15/15 by position (the cells are
    drawn independently, so the order is already random), blocks of BLOCK_RUNS runs appended."""
    n = atlas.n_cells
    cuts = np.round(np.array([0.7, 0.85]) * n).astype(np.int64)
    split = np.repeat(np.arange(3, dtype=np.int8), np.diff(np.r_[0, cuts, n]))
    attrs = {"inputs": [f"bench_scale generator (seed {atlas.seed})"], "counts_source": ["generated"],
             "seed": atlas.seed, "split_fractions": [0.7, 0.15, 0.15], "vocabulary_file": None, "split": "cells",
             "rounded_counts": {}, "codec": codec, "chunk_cells": CELLS_PER_CHUNK}
    writer = StoreWriter(path, n, atlas.nonzeros, atlas.n_genes, np.dtype(np.uint16), attrs)
    block = BLOCK_RUNS * RUN_CELLS
    for start in range(0, n, block):
        stop = min(start + block, n)
        writer.append(atlas.rows(start, stop), atlas.ids(start, stop))
    obs = atlas.obs(split)
    writer.close(obs, atlas.var, {"measured": pd.DataFrame(
        {d: np.ones(atlas.n_genes, bool) for d in obs["dataset_id"].cat.categories}, index=atlas.var.index)})


def build_probe(path: str, cells: int, genes: int, seed: int, pool_cells: int, how: str) -> dict:
    """Build one store (`how`: "writer" streams into StoreWriter, "convert" runs the converter on
    the generator) and report seconds, cells/s, peak RSS and disk, bytes a cell."""
    retain_freed_memory()
    rss_imports = _peak_rss()
    path = Path(path)
    t0 = time.perf_counter()
    atlas = ScaleAtlas(cells, genes, seed, pool_cells)
    generator_seconds = time.perf_counter() - t0
    with _DiskWatch(path.parent) as disk:
        start = time.perf_counter()
        if how == "writer":
            write_store(path, atlas)
        else:
            from sscell.data.convert import convert
            convert([_GeneratedOpener(atlas)], path, split="cells", seed=seed)
        seconds = time.perf_counter() - start
    size = _disk_bytes(path)
    x_size = _disk_bytes(path / "X")
    return {"how": how, "cells": cells, "genes": genes, "nonzeros": atlas.nonzeros,
            "nonzeros_per_cell": atlas.nonzeros / cells, "seconds": seconds,
            "cells_per_s": cells / seconds, "generator_setup_seconds": generator_seconds,
            "peak_rss_bytes": _peak_rss(), "rss_imports_bytes": rss_imports,
            "store_bytes": size, "bytes_per_cell": size / cells, "x_bytes_per_cell": x_size / cells,
            "peak_disk_bytes": disk.peak_bytes, "load_average": os.getloadavg()[0]}


class _GeneratedOpener:
    """The generator as a converter input (`sscell.data.convert.InputOpener`), so `convert()` runs
    its passes (id check, count pass, split, out-of-core shuffle) on it."""

    def __init__(self, atlas: ScaleAtlas):
        self.atlas = atlas

    def __call__(self, stack, *, gene_column, round_counts, split_column, required_obs):
        from sscell.data.inputs import H5adInput

        atlas = self.atlas

        class Rows:
            dtype = np.dtype(np.uint16)
            shape = (atlas.n_cells, atlas.n_genes)

            def __getitem__(self, rows: slice) -> scipy.sparse.csr_matrix:
                return atlas.rows(rows.start, min(rows.stop, atlas.n_cells))

        class Ids:
            def block(self, start: int, stop: int, decode: bool = False) -> np.ndarray:
                return atlas.ids(start, stop).astype(object)

        obs = atlas.obs(np.zeros(atlas.n_cells, np.int8)).drop(columns="split")
        return H5adInput(Path(f"generated-{atlas.n_cells}"), Rows(), "generated", obs, Ids(), atlas.var,
                         round_counts)


def build(path: Path, cells: int, genes: int, seed: int, pool_cells: int, how: str = "writer") -> dict:
    """`build_probe` in a fresh process (its peak RSS its own); an existing store is reused (its
    build figures read back from beside it)."""
    report = path.with_name(path.name + ".build.json")
    if report.exists() and (path.exists() or how == "convert"):  # a converted store is measured, then removed
        return {**json.loads(report.read_text()), "reused": True}
    shutil.rmtree(path, ignore_errors=True)
    result = _child(["--build-probe", str(path), "--cells", str(cells), "--genes", str(genes), "--seed", str(seed),
                     "--pool-cells", str(pool_cells), "--how", how])
    report.write_text(json.dumps(result))
    return result


def _child(args: list[str], threads: int | None = None) -> dict:
    """Run this module with `args` in a fresh process (pinned to the first `threads` cores) and
    return the JSON it prints."""
    from benchmarks.bench_loader import pinned

    if os.environ.get(IN_PROCESS):  # the test: no process start-up per probe
        with pinned(threads) if threads else contextlib.nullcontext():
            return _probe(_parser().parse_args(args))
    with pinned(threads) if threads else contextlib.nullcontext():
        run = subprocess.run([sys.executable, "-m", "benchmarks.bench_scale", *args], capture_output=True, text=True)
    if run.returncode:
        raise SscellError(f"bench_scale {' '.join(args[:2])} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- cold and warm reads


EVICT = "BENCH_SCALE_EVICT"  # environment: "fadvise" never drops the machine's caches (the test)
IN_PROCESS = "BENCH_SCALE_IN_PROCESS"  # environment: run the probes in this process (the test)


def drop_cache(store_path: str) -> str:
    """Evict the store's files from the page cache: the kernel's caches dropped where this
    process may ("drop_caches"), else (or with --evict=fadvise) posix_fadvise(DONTNEED) on every
    file of the store ("fadvise")."""
    try:
        if os.environ.get(EVICT) == "fadvise":
            raise PermissionError
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return "drop_caches"
    except OSError:
        for file in Path(store_path).rglob("*"):
            if file.is_file():
                fd = os.open(file, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
        return "fadvise"


def _read_bytes() -> int:
    """Bytes this process has had the storage layer fetch (/proc/self/io read_bytes)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def chunk_requests(store, rows: np.ndarray) -> list[tuple[str, int, int]]:
    """(file, offset, length) of every compressed inner chunk of X/data and X/indices that reading
    the runs of `rows` decodes, from the shards' indexes (zarr v3 sharding_indexed: a trailing
    index of (offset, nbytes) uint64 pairs per inner chunk, then a crc32c)."""
    requests = []
    for name in ("data", "indices"):
        meta = json.loads((Path(store.path) / "X" / name / "zarr.json").read_text())
        shard = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
        inner = meta["codecs"][0]["configuration"]["chunk_shape"][0]
        chunks = set()
        for lo, hi in store.indptr[np.asarray(runs(rows), np.int64).reshape(-1, 2)].tolist():
            if hi > lo:
                chunks.update(range(lo // inner, (hi - 1) // inner + 1))
        per_shard = shard // inner
        indexes = {}
        for chunk in sorted(chunks):
            s, c = divmod(chunk, per_shard)
            file = Path(store.path) / "X" / name / "c" / str(s)
            if s not in indexes:
                raw = file.read_bytes()[-(16 * per_shard + 4):-4]
                indexes[s] = np.frombuffer(raw, np.uint64).reshape(-1, 2)
            offset, nbytes = indexes[s][c].tolist()
            requests.append((str(file), offset, nbytes))
    return requests


def disk_rate(requests: list[tuple[str, int, int]], threads: int) -> dict:
    """Cold random reads of `requests` with os.pread on `threads` threads: bytes/s and requests/s."""
    fds = {f: os.open(f, os.O_RDONLY) for f in {f for f, _, _ in requests}}
    try:
        for fd in fds.values():  # a random pattern: no read-ahead beyond each request
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            total = sum(pool.map(lambda r: len(os.pread(fds[r[0]], r[2], r[1])), requests))
        seconds = time.perf_counter() - start
    finally:
        for fd in fds.values():
            os.close(fd)
    return {"threads": threads, "bytes_per_s": total / seconds, "requests_per_s": len(requests) / seconds,
            "mean_request_bytes": total / len(requests)}


def loader_probe(store_path: str, batch_size: int, cells: int, threads: int, rounds: int, cold: bool,
                 deep: int = 16) -> dict:
    """In a process pinned to `threads` cores: per round, fresh steps read by the loader (and by a
    raw read of the same runs) after evicting the store from the page cache (cold), then the same
    steps again (warm); the loader also with `deep` batches read ahead (prefetch threads) on the
    same cores ("loader_deep"); the disk's random-read rate for the compressed chunks those steps
    touch. Best of `rounds`."""
    from benchmarks.bench_loader import rate_and_cores
    from sscell.data.loader import CellLoader, prefetched

    retain_freed_memory()
    store = open_store(store_path)
    loader = CellLoader(store, "train", batch_size, seed=0, prefetch=threads)
    steps = -(-cells // batch_size) + 1  # rate() skips the first

    def raw(step: int) -> dict:
        rows = loader.rows[loader.local_selection(step)]
        store.read_nonzeros(runs(rows))
        return {"cell": rows}

    best: dict[str, tuple] = {}
    how = None
    kinds = (("loader", loader.batch, threads), ("raw", raw, threads), ("loader_deep", loader.batch, deep))
    for r in range(rounds):
        for i, (name, batch, depth) in enumerate(kinds):
            first = (len(kinds) * r + i) * steps  # fresh steps: cold means cold
            key = name
            if cold:
                how = drop_cache(store_path)
                before = _read_bytes()
                cells_s, cores = rate_and_cores(prefetched(batch, first, first + steps, depth), cells)
                fetched = (_read_bytes() - before) / (steps * batch_size)
                key = f"{name}_cold"
                if cells_s > best.get(key, (0,))[0]:
                    best[key] = (cells_s, cores, fetched)
            warm = rate_and_cores(prefetched(batch, first, first + steps, depth), cells)
            if warm[0] > best.get(f"{name}_warm", (0,))[0]:
                best[f"{name}_warm"] = (*warm, 0.0)
    result = {"threads": threads, "cores": len(os.sched_getaffinity(0)), "cache_drop": how,
              "tensorstore_threads": store.decode_threads, "deep_prefetch": deep}
    for key, (cells_s, cores, fetched) in best.items():
        result[f"{key}_cells_per_s"] = cells_s
        result[f"{key}_cores_busy"] = cores
        if key.endswith("cold"):
            result[f"{key}_disk_bytes_per_cell"] = fetched
    if cold:  # the disk itself, for the requests of fresh steps, at the loader's reads in flight
        first = len(kinds) * rounds * steps
        rows = np.concatenate([loader.rows[loader.local_selection(s)] for s in range(first, first + steps)])
        requests = chunk_requests(store, np.sort(rows))
        needed = sum(n for _, _, n in requests) / len(rows)
        disk = {}
        for q in dict.fromkeys((threads, 16, 64)):
            drop_cache(store_path)
            disk[str(q)] = disk_rate(requests, q)
        result["disk"] = {"chunk_bytes_per_cell": needed, "rates": disk,
                          "best_cells_per_s": max(d["bytes_per_s"] for d in disk.values()) / needed}
        for name in ("loader", "loader_deep", "raw"):
            result[f"{name}_cold_over_disk"] = result[f"{name}_cold_cells_per_s"] / result["disk"]["best_cells_per_s"]
    result["load_average"] = os.getloadavg()[0]
    return result


# ---------------------------------------------------------------- training, device-resident packing


def train_probe(store_path: str, batch_size: int, steps: int, prefetch: int, rounds_of_each: int = 3) -> dict:
    """The study's model (config defaults) trained at `batch_size`: steps/s on one in-memory batch
    vs the streamed loader on steps never read before, after evicting the store from the page
    cache, `rounds_of_each` interleaved rounds (medians); the share of wall time spent waiting for
    a batch."""
    from benchmarks.bench_loader import step_timer
    from sscell.training.mesh import global_batch

    retain_freed_memory()
    loader, _, sharding, run = step_timer(Path(store_path), batch_size, steps, prefetch)
    fixed = global_batch(loader.batch(0), sharding)
    run(iter([fixed] * steps))  # compile
    streamed_batches = (global_batch(b, sharding) for b in loader.iterate(steps, 10**9))
    run(streamed_batches)  # the epoch's padded width compiled; these steps now cached, the next are not
    rounds = {"in_memory": [], "streamed": [], "waiting": []}
    how, fetched = None, 0
    for _ in range(rounds_of_each):  # interleaved: the machine's load changes from minute to minute
        rounds["in_memory"].append(run(iter([fixed] * steps))[0])
        how = drop_cache(store_path)
        before = _read_bytes()
        streamed, waiting = run(streamed_batches)
        fetched += _read_bytes() - before
        rounds["streamed"].append(streamed)
        rounds["waiting"].append(waiting)
    in_memory, streamed = float(np.median(rounds["in_memory"])), float(np.median(rounds["streamed"]))
    return {"batch_size": batch_size, "steps": steps, "rounds": rounds_of_each, "prefetch_threads": prefetch,
            "cache_drop": how, "in_memory_steps_per_s": in_memory, "streamed_steps_per_s": streamed,
            "streamed_cells_per_s": streamed * batch_size, "waiting_share": float(np.median(rounds["waiting"])),
            "stall": 1 - streamed / in_memory, "rounds_steps_per_s": rounds,
            "disk_bytes_per_cell": fetched / (rounds_of_each * steps * batch_size),
            "train_cells": loader.n_cells, "load_average": os.getloadavg()[0]}


def resident_probe(store_path: str, cells: int) -> dict:
    """`DeviceResidentData.put` of `cells` train cells (a fraction of the split) from a cold page
    cache: seconds, and bytes held a million cells."""
    from sscell.config import default_config
    from sscell.data.loader import CellLoader
    from sscell.training.device_resident import DeviceResidentData
    from sscell.training.mesh import make_mesh

    retain_freed_memory()
    store = open_store(store_path)
    n_train = np.diff(store.split_range("train"))[0]
    loader = CellLoader(store, "train", min(1024, cells), seed=0, fraction=min(1.0, cells / n_train))
    how = drop_cache(store_path)
    start = time.perf_counter()
    resident = DeviceResidentData(loader, make_mesh(default_config().mesh))
    resident.put()
    resident.genes.block_until_ready()
    seconds = time.perf_counter() - start
    per_million = 1e6 / loader.n_cells
    return {"cells": loader.n_cells, "seconds": seconds, "seconds_per_million_cells": seconds * per_million,
            "bytes_per_device": resident.bytes_per_device,
            "bytes_per_million_cells": resident.bytes_per_device * per_million,
            "cache_drop": how, "peak_rss_bytes": _peak_rss(), "load_average": os.getloadavg()[0]}


# ---------------------------------------------------------------- kNN against many reference cells


def embeddings(n: int, seed: int, dims: int = 64, types: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """(n x dims float32, labels) of clustered embeddings: `types` Gaussian clusters of unequal
    size and spread, overlapping like a model's cell types (exact 5-NN accuracy ~0.86)."""
    centres = np.random.default_rng([7, 0]).normal(0, 1.0, (types, dims)).astype(np.float32)
    spread = np.random.default_rng([7, 1]).uniform(1.0, 2.0, types).astype(np.float32)
    weights = np.random.default_rng([7, 2]).dirichlet(np.ones(types))
    rng = np.random.default_rng([seed, 3])
    labels = rng.choice(types, n, p=weights)
    out = np.empty((n, dims), np.float32)
    for a in range(0, n, 2**18):
        b = min(a + 2**18, n)
        out[a:b] = centres[labels[a:b]] + spread[labels[a:b], None] * rng.standard_normal((b - a, dims), np.float32)
    return out, labels


def knn_probe(refs: int, queries: int, method: str, k: int, out: str) -> dict:
    """One search (`method`: exact or approximate) of `queries` against `refs` cells: seconds,
    peak RSS; the neighbours and kNN labels saved to `out` (.npz) for the agreement."""
    from sscell.evaluation.neighbors import nearest_neighbors, vote

    retain_freed_memory()
    ref, ref_labels = embeddings(refs, 0)
    query, query_labels = embeddings(queries, 1)
    rss_data = _peak_rss()
    start = time.perf_counter()
    indices, _ = nearest_neighbors(ref, query, k, method)
    seconds = time.perf_counter() - start
    predicted = vote(ref_labels[indices])
    np.savez(out, indices=indices, predicted=predicted)
    return {"refs": refs, "queries": queries, "method": method, "k": k, "seconds": seconds,
            "peak_rss_bytes": _peak_rss(), "rss_with_embeddings_bytes": rss_data,
            "accuracy": float((predicted == query_labels).mean()), "load_average": os.getloadavg()[0]}


def knn(workdir: Path, refs: int, queries: int, k: int, methods: list[str]) -> dict:
    """`knn_probe` per method in its own process, and the approximate search's agreement with the exact one."""
    result = {}
    for method in methods:
        out = workdir / f"knn_{refs}_{method}.npz"
        result[method] = _child(["--knn-probe", str(out), "--knn-refs", str(refs), "--knn-queries", str(queries),
                                 "--knn-method", method, "--k", str(k)])
    if {"exact", "approximate"} <= set(methods):
        exact, approx = (np.load(workdir / f"knn_{refs}_{m}.npz") for m in ("exact", "approximate"))
        found = [np.isin(a, e).sum() for a, e in zip(approx["indices"], exact["indices"])]
        result["approximate_neighbour_recall"] = float(np.sum(found) / exact["indices"].size)
        result["approximate_label_agreement"] = float((approx["predicted"] == exact["predicted"]).mean())
    return result


# ---------------------------------------------------------------- a store in a (local) bucket


def bucket_rates(store_path: Path, batch_size: int, cells: int, threads: list[int]) -> dict:
    """The store copied to a local S3 server (moto) and read by the loader from its s3:// URL,
    cells/s per prefetch thread count, next to the same store read locally (warm)."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError:
        return {"skipped": "needs moto[server] and boto3: pip install -e '.[test]'"}
    from benchmarks.bench_loader import sscell_rates

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                             "AWS_DEFAULT_REGION")}
    try:
        host, port = server.get_host_and_port()
        os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="test",
                          AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
        s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        s3.create_bucket(Bucket="atlas")
        start = time.perf_counter()
        for file in (f for f in store_path.rglob("*") if f.is_file()):
            s3.upload_file(str(file), "atlas", f"store/{file.relative_to(store_path).as_posix()}")
        upload = time.perf_counter() - start
        start = time.perf_counter()
        open_store("s3://atlas/store")
        opened = time.perf_counter() - start
        remote = sscell_rates("s3://atlas/store", batch_size, cells, threads)
        local = sscell_rates(store_path, batch_size, cells, threads)
        return {"server": "moto on 127.0.0.1 (local: no network latency)", "store_bytes": _disk_bytes(store_path),
                "upload_seconds": upload, "open_seconds": opened, "s3_cells_per_s": remote,
                "local_warm_cells_per_s": local, "load_average": os.getloadavg()[0]}
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# ---------------------------------------------------------------- the whole run, the plot


def machine() -> dict:
    from sscell.models.precision import cpu_flags, cpu_model  # here: it imports jax, which no probe needs

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "amx": "amx_tile" in cpu_flags(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "date": datetime.date.today().isoformat()}


def run(args: argparse.Namespace) -> dict:
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": machine(), "genes": args.genes, "batch_size": args.batch_size,
                    "load_average_start": os.getloadavg()[0], "sizes": {}}
    stores = {}
    for cells in [] if args.knn_only else args.sizes:
        path = workdir / f"store_{cells}x{args.genes}"
        entry = result["sizes"][str(cells)] = {"build": build(path, cells, args.genes, args.seed, args.pool_cells)}
        stores[cells] = path
        if "loader" not in args.skip:
            entry["loader"] = {str(t): _child(["--loader-probe", str(path), "--batch-size", str(args.batch_size),
                                               "--read-cells", str(args.read_cells), "--threads", str(t),
                                               "--rounds", str(args.rounds)], threads=t) for t in args.threads}
        _emit(result, args.out)
    for cells in args.convert_sizes:
        path = workdir / f"converted_{cells}x{args.genes}"
        result.setdefault("convert", {})[str(cells)] = build(path, cells, args.genes, args.seed, args.pool_cells,
                                                             "convert")
        shutil.rmtree(path, ignore_errors=True)
        _emit(result, args.out)
    if args.knn_only:
        args.skip = ["train", "resident", "bucket"]
    largest = stores[max(stores)] if stores else None
    if "train" not in args.skip:
        result["train"] = _child(["--train-probe", str(largest), "--batch-size", str(args.batch_size),
                                  "--steps", str(args.train_steps), "--threads", str(TRAIN_PREFETCH)])
        _emit(result, args.out)
    if "resident" not in args.skip:
        result["device_resident"] = [_child(["--resident-probe", str(largest), "--cells", str(c)])
                                     for c in args.resident_cells]
        _emit(result, args.out)
    if "knn" not in args.skip:
        result["knn"] = {str(r): knn(workdir, r, args.knn_queries, args.k, args.knn_methods) for r in args.knn_refs}
        _emit(result, args.out)
    if "bucket" not in args.skip:
        result["bucket"] = bucket_rates(stores[min(stores)], args.batch_size, args.bucket_read_cells, args.threads)
    result["load_average_end"] = os.getloadavg()[0]
    _emit(result, args.out)
    return result


def _emit(result: dict, out: str | None) -> None:
    """Write the result so far (a long run killed midway keeps what it measured)."""
    if out:
        Path(out).write_text(json.dumps(result, indent=2))


def plot(result: dict, png: str) -> None:
    """The cost curves of a result: build, cold / warm loader vs disk per size, kNN time and memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(int(s) for s in result["sizes"])
    m = np.array(sizes) / 1e6
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    build_rate = [result["sizes"][str(s)]["build"]["cells_per_s"] / 1e3 for s in sizes]
    build_rss = [result["sizes"][str(s)]["build"]["peak_rss_bytes"] / 2**30 for s in sizes]
    ax = axes[0]
    ax.plot(m, build_rate, "o-", label="store write, k cells/s")
    if result.get("convert"):
        conv = sorted(int(s) for s in result["convert"])
        ax.plot(np.array(conv) / 1e6, [result["convert"][str(s)]["cells_per_s"] / 1e3 for s in conv], "s-",
                label="convert(), k cells/s")
        ax.plot(np.array(conv) / 1e6, [result["convert"][str(s)]["peak_rss_bytes"] / 2**30 for s in conv], "s--",
                label="convert() peak RSS, GiB")
    ax.plot(m, build_rss, "o--", label="store write peak RSS, GiB")
    ax.set(xscale="log", xlabel="cells (millions)", title="building a store")
    ax.legend(fontsize=8)
    ax = axes[1]
    for t in sorted({t for s in sizes for t in result["sizes"][str(s)].get("loader", {})}):
        probes = [result["sizes"][str(s)]["loader"][t] for s in sizes]
        ax.plot(m, [p["loader_cold_cells_per_s"] / 1e3 for p in probes], "o-", label=f"loader cold, {t} thr")
        ax.plot(m, [p["loader_warm_cells_per_s"] / 1e3 for p in probes], "o--", label=f"loader warm, {t} thr")
        ax.plot(m, [p["disk"]["best_cells_per_s"] / 1e3 for p in probes], "k:", marker="x",
                label=f"disk random reads (same chunks), {t} thr run")
    ax.set(xscale="log", xlabel="cells in the store (millions)", ylabel="k cells/s", title="reading batches")
    ax.legend(fontsize=7)
    ax = axes[2]
    if result.get("knn"):
        refs = sorted(int(r) for r in result["knn"])
        for method, mark in (("exact", "o"), ("approximate", "s")):
            have = [r for r in refs if method in result["knn"][str(r)]]
            if have:
                ax.plot(np.array(have) / 1e6, [result["knn"][str(r)][method]["seconds"] for r in have], mark + "-",
                        label=f"{method}: seconds")
                ax.plot(np.array(have) / 1e6, [result["knn"][str(r)][method]["peak_rss_bytes"] / 2**30 * 100
                                               for r in have], mark + "--", label=f"{method}: peak RSS, GiB x 100")
        ax.set(xscale="log", yscale="log", xlabel="reference cells (millions)",
               title=f"kNN, {result['knn'][str(refs[0])].get('exact', {}).get('queries', '')} queries")
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['machine']['cpu']}, {result['machine']['cores']} cores, {result['machine']['date']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where the stores go (kept and reused; default: a temporary directory)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 3_000_000, 10_000_000])
    parser.add_argument("--convert-sizes", type=int, nargs="*", default=[],
                        help="cells to run the converter on (scratch: ~8 bytes a nonzero beside the store)")
    parser.add_argument("--genes", type=int, default=STUDY_GENES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool-cells", type=int, default=32_768, help="distinct cells the generator draws")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--read-cells", type=int, default=40_960, help="cells per loader measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--resident-cells", type=int, nargs="*", default=[100_000, 500_000])
    parser.add_argument("--knn-refs", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--knn-queries", type=int, default=100_000)
    parser.add_argument("--knn-methods", nargs="+", default=["exact", "approximate"])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--knn-only", action="store_true", help="measure the kNN part alone (no stores built)")
    parser.add_argument("--bucket-read-cells", type=int, default=20_480)
    parser.add_argument("--skip", nargs="*", default=[], choices=["loader", "train", "resident", "knn", "bucket"])
    parser.add_argument("--evict", choices=["drop_caches", "fadvise"], default="drop_caches",
                        help="how to empty the page cache: the kernel's caches where permitted (else fadvise), "
                             "or posix_fadvise(DONTNEED) on the store's files only")
    parser.add_argument("--in-process", action="store_true", help="run every probe in this process (faster; "
                        "peak RSS figures then include the earlier parts)")
    parser.add_argument("--out", help="write the JSON here too (updated after each part)")
    parser.add_argument("--plot", help="draw the curves into this PNG")
    parser.add_argument("--from-json", help="plot a saved result instead of measuring")
    internal = {"--build-probe": str, "--how": str, "--cells": int, "--loader-probe": str, "--train-probe": str,
                "--steps": int, "--resident-probe": str, "--knn-probe": str, "--knn-method": str}
    for flag, kind in internal.items():
        parser.add_argument(flag, type=kind, help=argparse.SUPPRESS)
    return parser


def _probe(args: argparse.Namespace) -> dict | None:
    """The one measurement an internal flag asks for, or None."""
    if args.build_probe:
        return build_probe(args.build_probe, args.cells, args.genes, args.seed, args.pool_cells, args.how)
    if args.loader_probe:
        return loader_probe(args.loader_probe, args.batch_size, args.read_cells, args.threads[0], args.rounds,
                            cold=True)
    if args.train_probe:
        return train_probe(args.train_probe, args.batch_size, args.steps, args.threads[0])
    if args.resident_probe:
        return resident_probe(args.resident_probe, args.cells)
    if args.knn_probe:
        return knn_probe(args.knn_refs[0], args.knn_queries, args.knn_method, args.k, args.knn_probe)
    return None


def main() -> None:
    args = _parser().parse_args()
    if args.evict == "fadvise":
        os.environ[EVICT] = "fadvise"  # the probes' processes inherit it
    if args.in_process:
        os.environ[IN_PROCESS] = "1"
    with exit_on_error():
        result = _probe(args)
        probe = result is not None
        if args.from_json:
            result = json.loads(Path(args.from_json).read_text())
        elif not probe:
            with _workdir(args.workdir) as workdir:
                args.workdir = workdir
                result = run(args)
        if args.plot:
            plot(result, args.plot)
    print(json.dumps(result, indent=None if probe else 2))


@contextlib.contextmanager
def _workdir(path: str | None) -> Iterator[str]:
    if path:
        yield path
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        yield tmp


if __name__ == "__main__":
    main()
