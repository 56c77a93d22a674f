"""Loader benchmark: sscell's loader against anndata backed, scDataset and annbatch, the train
step's own appetite, and host memory as the store grows; prints one JSON object.

Same data, same machine, same run: a synthetic atlas (`--cells` x `--genes`) written as .h5ad
and converted into an sscell store; every loader reads those cells (annbatch reads the store
itself, which is an AnnData zarr store), with a warm page cache for all of them.

    python -m benchmarks.bench_loader                      # 100 k x 19,331 genes, 1 M x 2,000 for memory
    python -m benchmarks.bench_loader --workdir=/tmp/bench  # keep (and reuse) the generated data
    python -m benchmarks.bench_loader --annbatch-python=PY  # a Python >= 3.12 with `pip install annbatch zarrs`

Figures: `cells_per_s` of each loader (sscell per prefetch thread count); `train_step`: steps/s
of the study's model (config defaults) fed one in-memory batch vs the real loader, with
`waiting_share` the share of wall time the loop waited for a batch and `stall` the throughput
lost to the loader (waiting plus the loader's threads competing for the same CPU cores);
`codecs`: per X compressor (`convert --codec`) and chunk size (`--chunk-cells`: the default
and the 128 cells of stores written before 2026-12-05), its bytes per cell and, per thread count t, in
a process pinned to t cores (tensorstore decoding on those t, t prefetch threads), the raw
read-and-decode cells/s of the loader's rows next to the loader's (`loader_over_raw`), each the
best of `--rounds` interleaved rounds, with the cores each kept busy (`*_cores_busy`: on shared
cores, what it got) and its cells per CPU second, with freed memory retained as training runs
(`sscell.allocator`) and again with glibc's defaults (`default_allocator`);
`shipped_bytes`: host-to-device bytes per cell of the loader's flat CSR batches (per data
shard count) against the padded-row layout they replaced (cells x a power-of-two width >= the
fullest row); `memory`: peak RSS (Linux VmHWM) of a process that opens a store and loads
batches, for `--cells` and `--memory-cells` cells of `--memory-genes` genes, and the host bytes
per cell the store and loader hold (indptr, label codes, selected rows).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sscell.allocator import retain_freed_memory
from sscell.data.convert import convert
from sscell.data.loader import CellLoader, prefetched
from sscell.data.store import CELLS_PER_CHUNK, available_cores, open_store, runs
from sscell.data.synthetic import AtlasSpec, write_atlas
from sscell.errors import exit_on_error


def dataset(workdir: Path, cells: int, genes: int, codec: str = "lz4",
            chunk_cells: int = CELLS_PER_CHUNK) -> tuple[Path, Path]:
    """(.h5ad, store with X compressed by `codec` in chunks of `chunk_cells` cells) of a synthetic
    atlas in `workdir`, generated and converted unless present."""
    h5ad = workdir / f"atlas_{cells}x{genes}.h5ad"
    store = workdir / f"store_{cells}x{genes}_{codec}_chunk{chunk_cells}"
    if not h5ad.exists():
        write_atlas(AtlasSpec(n_cells=cells, n_genes=genes), h5ad)
    if not store.exists():
        convert([h5ad], store, seed=0, codec=codec, chunk_cells=chunk_cells)
    return h5ad, store


def rate(batches, cells: int) -> float:
    """Cells/s of an iterator of batches (each a sized row collection), after its first batch."""
    return rate_and_cores(batches, cells)[0]


def rate_and_cores(batches, cells: int) -> tuple[float, float]:
    """`rate`, and the CPU cores this process kept busy meanwhile (its CPU seconds, every thread,
    per second): on shared cores, what it got of the cores it may use."""
    next(batches)
    seen, start, cpu = 0, time.perf_counter(), time.process_time()
    for batch in batches:
        seen += batch.shape[0] if hasattr(batch, "shape") else len(batch["cell"])
        if seen >= cells:
            break
    wall = time.perf_counter() - start
    return seen / wall, (time.process_time() - cpu) / wall


def sscell_rates(store_path: Path, batch_size: int, cells: int, threads: list[int],
                 block_cells: int = 64) -> dict[str, float]:
    """Cells/s of the train split's shuffled batches per prefetch thread count."""
    store = open_store(store_path)
    result = {}
    for t in threads:
        loader = CellLoader(store, "train", batch_size, seed=t, prefetch=t, block_cells=block_cells)
        result[str(t)] = rate(loader.iterate(0, 10**9), cells)
    return result


def codec_rates(store_path: Path, batch_size: int, cells: int, threads: list[int], rounds: int) -> dict:
    """Per thread count t: `codec_probe` in a fresh process pinned to t cores, with freed memory
    retained as training does (`sscell.allocator`) and, under "default_allocator", without; and
    the store's X bytes per cell."""
    x_bytes = sum(f.stat().st_size for f in (Path(store_path) / "X").rglob("*") if f.is_file())
    result = {"x_bytes_per_cell": x_bytes / open_store(store_path).n_cells, "threads": {}}
    for t in threads:
        probes = []
        for flags in ([], ["--default-allocator"]):
            with pinned(t):  # the child inherits this thread's affinity
                run = subprocess.run([sys.executable, "-m", "benchmarks.bench_loader", "--codec-probe", str(store_path),
                                      "--batch-size", str(batch_size), "--read-cells", str(cells), "--threads", str(t),
                                      "--rounds", str(rounds), *flags], capture_output=True, text=True, check=True)
            probes.append(json.loads(run.stdout))
        result["threads"][str(t)] = {**probes[0], "default_allocator": probes[1]}
    return result


@contextlib.contextmanager
def pinned(threads: int) -> Iterator[None]:
    """This thread (and the processes it starts) on the first `threads` of its cores meanwhile
    (Linux; elsewhere on every core)."""
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores[:threads])
    try:
        yield
    finally:
        os.sched_setaffinity(0, cores)


def codec_probe(store_path: str, batch_size: int, cells: int, threads: int, rounds: int, retain: bool = True) -> dict:
    """Cells/s of the codec's raw reads (the loader's batches' runs of rows read and decoded by
    tensorstore into one array, nothing laid out) and of the loader, each on `threads` prefetch
    threads with tensorstore decoding on this process's cores (`available_cores`: pin it to
    `threads` cores): the best of `rounds` interleaved rounds, each reading the same steps.
    `retain`: first keep freed memory in the process, as training does (`retain_freed_memory`)."""
    retained = retain and retain_freed_memory()
    store = open_store(store_path)
    loader = CellLoader(store, "train", batch_size, seed=0, prefetch=threads)

    def raw(step: int) -> dict:
        rows = loader.rows[loader.local_selection(step)]
        store.read_nonzeros(runs(rows))
        return {"cell": rows}

    steps = -(-cells // batch_size) + 1  # rate() skips the first
    best = {"raw": (0.0, 0.0), "loader": (0.0, 0.0)}
    for first in range(0, rounds * steps, steps):
        for name, batch in (("raw", raw), ("loader", loader.batch)):
            best[name] = max(best[name], rate_and_cores(prefetched(batch, first, first + steps, threads), cells))
    (raw_rate, raw_cores), (loader_rate, loader_cores) = best["raw"], best["loader"]
    return {"cores": available_cores(), "tensorstore_threads": store.decode_threads, "prefetch_threads": threads,
            "retained_freed_memory": retained,
            "raw_cells_per_s": raw_rate, "loader_cells_per_s": loader_rate, "loader_over_raw": loader_rate / raw_rate,
            "raw_cores_busy": raw_cores, "loader_cores_busy": loader_cores,
            "raw_cells_per_cpu_s": raw_rate / raw_cores, "loader_cells_per_cpu_s": loader_rate / loader_cores,
            "load_average": os.getloadavg()[0]}


def anndata_backed_rate(h5ad: Path, batch_size: int, cells: int) -> float:
    """Cells/s of random minibatches (sorted indices, as h5py requires) from a backed .h5ad."""
    import anndata

    x = anndata.read_h5ad(h5ad, backed="r").X
    rng = np.random.default_rng(0)
    return rate((x[np.sort(rng.choice(x.shape[0], batch_size, replace=False))] for _ in itertools.repeat(None)), cells)


def scdataset_rate(h5ad: Path, batch_size: int, cells: int) -> float | str:
    """Cells/s of scDataset's block shuffling (64-cell blocks, fetch factor 16) over a backed .h5ad."""
    try:
        from scdataset import BlockShuffling, scDataset
    except ImportError:
        return "skipped: scDataset is not installed (pip install -e '.[bench]')"
    import anndata

    adata = anndata.read_h5ad(h5ad, backed="r")
    data = scDataset(adata, BlockShuffling(block_size=64), batch_size=batch_size, fetch_factor=16, drop_last=True,
                     fetch_callback=lambda collection, rows: collection.X[rows])
    return rate(iter(data), cells)


def annbatch_rates(python: str | None, store: Path, batch_size: int, cells: int) -> dict | str:
    """annbatch's cells/s (64- and 512-cell chunks) on the store, from its own interpreter."""
    if not python:
        return ("skipped: annbatch needs Python >= 3.12; create a venv with it (python3.12 -m venv V && "
                "V/bin/pip install annbatch zarrs) and pass --annbatch-python=V/bin/python")
    worker = Path(__file__).with_name("annbatch_worker.py")
    run = subprocess.run([python, str(worker), str(store), "--batch-size", str(batch_size), "--cells", str(cells)],
                         check=False, capture_output=True, text=True)
    if run.returncode:
        return f"skipped: the annbatch worker failed: {run.stderr.strip().splitlines()[-1:]}"
    return json.loads(run.stdout)


def shipped_bytes(store_path: Path, batch_size: int, batches: int, shards: int) -> dict:
    """Bytes per cell of the loader's batches (genes, counts, indptr) in `shards` shards, against
    the padded rows they replaced: each cell as wide as the batch's fullest row rounded up to a
    power of two (>= 16, <= the genes), one gene index and one count per slot."""
    store = open_store(store_path)
    loader = CellLoader(store, "train", batch_size, seed=0, shards=shards)
    slots = indptr = padded = nonzeros = 0
    for step in range(batches):
        batch = loader.batch(step)
        slot_bytes = batch["genes"].itemsize + batch["counts"].itemsize
        slots += batch["genes"].size * slot_bytes
        indptr += batch["indptr"].nbytes
        lengths = np.diff(batch["indptr"], axis=1).ravel()
        padded += len(lengths) * min(store.n_genes, max(16, 1 << (int(lengths.max()) - 1).bit_length())) * slot_bytes
        nonzeros += int(lengths.sum()) * slot_bytes
    cells = batches * batch_size
    return {"shards": shards, "flat_bytes_per_cell": (slots + indptr) / cells,
            "padded_rows_bytes_per_cell": padded / cells, "padded_rows_over_flat": padded / (slots + indptr),
            "nonzero_bytes_per_cell": nonzeros / cells, "flat_padding_share": 1 - nonzeros / slots}


def step_timer(store_path: Path, batch_size: int, steps: int, prefetch: int, **model: object):
    """The study's masked autoencoder (config defaults, `config.model` overridden by `model`) on
    this store: (its train loader, mesh, batch sharding, `run(batches) -> (steps/s, share of wall
    time spent waiting for a batch)` over `steps` steps of `batches`)."""
    import jax

    from sscell.config import default_config
    from sscell.training.mesh import batch_sharded, local_data_shards, make_mesh
    from sscell.training.state import create_state
    from sscell.training.step import make_train_step
    from sscell.training.train import build, sharded_state_layout

    config = default_config()
    config.train.batch_size, config.data.prefetch = batch_size, prefetch
    config.model.update(model)
    store = open_store(store_path)
    setup = build(config, store)
    task, info, model, optimizer, _, init_extra = setup
    mesh = make_mesh(config.mesh)
    _, state_sharding = sharded_state_layout(config, setup, mesh)
    batch_sharding = batch_sharded(mesh)
    state = create_state(model, optimizer, jax.random.key(0), state_sharding, init_extra)
    step = make_train_step(task, model, config, optimizer, info, state_sharding, batch_sharding)
    loader = CellLoader(store, "train", batch_size, seed=0, prefetch=prefetch, shards=local_data_shards(mesh))

    def run(batches) -> tuple[float, float]:
        nonlocal state
        waited, start = 0.0, time.perf_counter()
        for _ in range(steps):
            t = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - t
            state, metrics = step(state, batch, jax.random.key(1))
        jax.block_until_ready(metrics)
        return steps / (time.perf_counter() - start), waited / (time.perf_counter() - start)

    return loader, mesh, batch_sharding, run


def train_step_rates(store_path: Path, batch_size: int, steps: int, prefetch: int, device_resident: bool = False,
                     **model: object) -> dict:
    """The study's masked autoencoder (config defaults, `config.model` overridden by `model`)
    trained on this store: steps/s fed one in-memory batch vs the real loader (or,
    `device_resident`, the batches gathered on the devices: sscell.training.device_resident), and
    the share of step time spent waiting for data."""
    import jax

    from sscell.training.device_resident import DeviceResidentData
    from sscell.training.mesh import global_batch

    loader, mesh, batch_sharding, run = step_timer(store_path, batch_size, steps, prefetch, **model)

    def batches(start: int, stop: int):
        return (global_batch(b, batch_sharding) for b in loader.iterate(start, stop))

    if device_resident:
        resident = DeviceResidentData(loader, mesh)
        resident.put()
        batches = resident.iterate
    fixed = global_batch(loader.batch(0), batch_sharding)
    run(itertools.repeat(fixed))  # compile for its width
    in_memory, _ = run(itertools.repeat(fixed))
    run(batches(0, steps))  # compile for every width these steps use
    streamed, waiting = run(batches(0, steps))
    return {"data": "device_resident" if device_resident else "streamed", "prefetch_threads": prefetch,
            "in_memory_steps_per_s": in_memory, "loader_steps_per_s": streamed,
            "in_memory_cells_per_s": in_memory * batch_size, "loader_cells_per_s": streamed * batch_size,
            "stall": 1 - streamed / in_memory, "waiting_share": waiting, "devices": str(jax.devices())}


def memory_probe(store_path: str, batch_size: int, batches: int) -> dict:
    """Peak RSS (MiB) of this process after opening a store and loading batches from it."""
    def peak() -> float:
        status = Path("/proc/self/status").read_text().split("VmHWM:")[1]
        return int(status.split()[0]) / 1024

    before = peak()
    store = open_store(store_path)
    opened = peak()
    loader = CellLoader(store, "train", batch_size, seed=0)
    for _ in zip(range(batches), loader.iterate(0, batches)):
        pass
    labels = int(store.labels.memory_usage(deep=True).sum())
    host = store.indptr.nbytes + labels + loader.rows.nbytes + sum(c.nbytes for c in loader.labels.values())
    return {"cells": store.n_cells, "genes": store.n_genes, "rss_imports_mib": before,
            "rss_after_open_mib": opened, "peak_rss_mib": peak(),
            "host_state_bytes_per_cell": host / store.n_cells, "labels_bytes_per_cell": labels / store.n_cells}


def memory(store_path: Path, batch_size: int, batches: int) -> dict:
    """`memory_probe` in a fresh process, so peaks of one store do not hide another's."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.bench_loader", "--memory-probe", str(store_path),
                          "--batch-size", str(batch_size), "--memory-batches", str(batches)],
                         capture_output=True, text=True, check=True)
    return json.loads(run.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_loader", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where to generate (and find) the data; default: a temporary directory")
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--genes", type=int, default=19_331)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--read-cells", type=int, default=40_000, help="cells each loader reads per measurement")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8], help="sscell prefetch threads")
    parser.add_argument("--step-batch-sizes", type=int, nargs="*", default=[256, 1024])
    parser.add_argument("--steps", type=int, default=10, help="train steps per step measurement")
    parser.add_argument("--memory-cells", type=int, default=1_000_000)
    parser.add_argument("--memory-genes", type=int, default=2_000)
    parser.add_argument("--memory-batches", type=int, default=50)
    parser.add_argument("--annbatch-python", default=os.environ.get("ANNBATCH_PYTHON"),
                        help="a Python >= 3.12 with annbatch installed (default: $ANNBATCH_PYTHON)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["anndata", "scdataset", "annbatch", "bytes", "train_step", "memory", "codecs"])
    parser.add_argument("--codecs", nargs="*", default=["lz4", "zstd"], help="X compressors to compare (raw vs loader)")
    parser.add_argument("--chunk-cells", type=int, nargs="*", default=[CELLS_PER_CHUNK, 128],
                        help="X chunk sizes (cells) to compare, per codec")
    parser.add_argument("--rounds", type=int, default=10,
                        help="interleaved raw / loader rounds per codec and thread count (the best counts)")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: measure one store, print JSON
    parser.add_argument("--codec-probe", help=argparse.SUPPRESS)  # internal: raw vs loader on one store
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's malloc as it is (training retains freed memory: sscell.allocator)")
    args = parser.parse_args()
    if not args.default_allocator:  # as training runs (sscell.allocator)
        retain_freed_memory()
    with exit_on_error():
        if args.memory_probe:
            print(json.dumps(memory_probe(args.memory_probe, args.batch_size, args.memory_batches)))
            return
        if args.codec_probe:
            print(json.dumps(codec_probe(args.codec_probe, args.batch_size, args.read_cells, args.threads[0],
                                         args.rounds, retain=not args.default_allocator)))
            return
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(args.workdir or tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            h5ad, store = dataset(workdir, args.cells, args.genes)
            b, n = args.batch_size, args.read_cells
            result = {"cells": args.cells, "genes": args.genes, "batch_size": b, "cpu_count": os.cpu_count(),
                      "cells_per_s": {"sscell": sscell_rates(store, b, n, args.threads)}}
            rates = result["cells_per_s"]
            if "anndata" not in args.skip:
                rates["anndata_backed"] = anndata_backed_rate(h5ad, b, min(n, 10 * b))
            if "scdataset" not in args.skip:
                rates["scdataset"] = scdataset_rate(h5ad, b, n)
            if "annbatch" not in args.skip:
                rates["annbatch"] = annbatch_rates(args.annbatch_python, store, b, n)
            best = max(rates["sscell"].values())
            result["ratios"] = {f"sscell_best_over_{k}": best / v for k, v in rates.items()
                                if isinstance(v, float)}
            if isinstance(rates.get("annbatch"), dict):  # also sscell reading blocks of annbatch's chunk size
                threads = [int(max(rates["sscell"], key=rates["sscell"].get))]
                for c, v in rates["annbatch"]["cells_per_s"].items():
                    same = max(sscell_rates(store, b, n, threads, int(c)).values())
                    rates[f"sscell_block{c}"] = same
                    result["ratios"].update({f"sscell_best_over_annbatch_chunk{c}": best / v,
                                             f"sscell_block{c}_over_annbatch_chunk{c}": same / v})
            if "codecs" not in args.skip:
                result["codecs"] = {
                    c: {str(k): codec_rates(dataset(workdir, args.cells, args.genes, c, k)[1], b, n, args.threads,
                                            args.rounds) for k in args.chunk_cells}
                    for c in args.codecs}
            if "bytes" not in args.skip:
                result["shipped_bytes"] = [shipped_bytes(store, b, 20, s) for s in (1, 8)]
            if "train_step" not in args.skip:
                threads = int(max(rates["sscell"], key=rates["sscell"].get))  # the loader's best setting
                result["train_step"] = {str(s): train_step_rates(store, s, args.steps, threads)
                                        for s in args.step_batch_sizes}
            if "memory" not in args.skip:
                _, large = dataset(workdir, args.memory_cells, args.memory_genes)
                _, small = dataset(workdir, args.cells, args.memory_genes)
                result["memory"] = [memory(s, b, args.memory_batches) for s in (small, large)]
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
