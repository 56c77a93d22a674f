"""Train-step benchmark: sscell's masked autoencoder step against the same model and loss in plain
PyTorch (eager and torch.compile), model FLOPs utilisation, data stall and training memory; prints
one JSON object.

Same data, same process, same threads: a synthetic atlas (`--cells` x `--genes`, ~92% zeros)
converted into a store; sscell trains on its loader's batches and PyTorch on dense float32
counts of the same atlas, both held in memory on the device (PyTorch on the GPU when JAX runs on
one and torch sees CUDA, else both on the CPU; CUDA timings wait for the device). Each round times
`--steps` steps of every contender back to back, so a ratio compares neighbours in time on a
noisy machine; the figures are medians over `--rounds` rounds.

    pip install -e ".[bench]"   # torch: pip install torch --index-url https://download.pytorch.org/whl/cpu
    python -m benchmarks.bench_train --workdir=/tmp/bench   # keep (and reuse) the generated data
    python -m benchmarks.bench_train --batch-sizes 1024 8192 --skip torch_eager train_step memory

Figures, per batch size (`--batch-sizes`, one row each): `cells_per_s` of sscell (the real
`make_train_step`, config defaults) with `model.dtype` bfloat16 and float32 on in-memory
batches, sscell float32 with `model.sparse_nonzeros` set, sscell bfloat16 fed by the streamed
loader (`sscell_bf16_streamed`) and by batches gathered on the device from the resident train
cells (`sscell_bf16_resident`, `data.device_resident`), torch eager and torch.compile (float32,
the reference) and torch.compile under bfloat16 autocast; `ratios` of each sscell to each torch
contender and to `sscell_bf16` (median of per-round ratios); `flops`: the model's matmul FLOPs
per cell (2*m*n*k per layer, x3 for forward and backward), the FLOP/s each contender achieved
and its share (MFU) of a (batch x genes) @ (genes x 512) matmul measured in this process after
every round, with the contenders' threads: in its own precision (bfloat16 operands for the
*bf16* contenders) by its own framework (`mfu`), by jax in bfloat16 and in float32
(`mfu_vs_jax_matmul`) and by the faster framework (`mfu_vs_best_matmul`). `train_step`: the
in-memory vs real-loader steps/s of `bench_loader` (data stall). `memory`: peak RSS (VmHWM) of a
training process, a fresh one per store size (`--memory-cells` x `--memory-genes`).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.bench_loader import dataset, train_step_rates
from sscell.allocator import retain_freed_memory
from sscell.errors import SscellError, exit_on_error

# name: (config.model overrides, where the batches come from: `sscell_contender`'s `data`)
SSCELL = {"sscell_bf16": ({"dtype": "bfloat16"}, "memory"), "sscell_float32": ({"dtype": "float32"}, "memory"),
          "sscell_sparse": ({"dtype": "float32"}, "memory"),  # plus race_batch_size's sparse_nonzeros
          "sscell_bf16_streamed": ({"dtype": "bfloat16"}, "streamed"),
          "sscell_bf16_resident": ({"dtype": "bfloat16"}, "resident")}
TORCH = ("torch_eager", "torch_compile", "torch_compile_bf16")
CONTENDERS = (*SSCELL, *TORCH)


def flops_per_cell(n_genes: int, hidden: tuple[int, ...], latent: int) -> int:
    """Matmul FLOPs of one cell's forward and backward pass: 3 x sum over layers of 2 * fan_in * fan_out."""
    widths = (n_genes, *hidden, latent, *reversed(hidden), n_genes)
    return 3 * sum(2 * a * b for a, b in itertools.pairwise(widths))


def torch_device() -> str:
    """Where the PyTorch reference runs: the GPU when JAX runs on one and torch sees CUDA, else the CPU."""
    import jax
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def torch_synchronise(device: str) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def sscell_contender(store_path: Path, batch_size: int, n_batches: int, data: str = "memory",
                     **model: object) -> Callable[[int], None]:
    """`run(steps)` of sscell's train step (config defaults, `config.model` overridden by `model`).

    `data` "memory": it cycles `n_batches` loader batches already on the device; "streamed": the
    loader reads, lays out and transfers every batch (`data.prefetch` threads); "resident": the
    train cells are put on the device once and each batch is gathered there
    (`data.device_resident`). Every source cycles through steps of the first epoch, whose batches
    have one padded width, so no step compiles after the first."""
    import jax

    from sscell.config import default_config
    from sscell.data.store import open_store
    from sscell.training.device_resident import train_batches
    from sscell.training.mesh import batch_sharded, global_batch, local_data_shards, make_mesh
    from sscell.training.state import create_state
    from sscell.training.step import make_train_step
    from sscell.training.train import build, make_loader, sharded_state_layout

    if data not in ("memory", "streamed", "resident"):
        raise SscellError(f"unknown batch source {data!r}; choose memory, streamed or resident")
    config = default_config()
    config.train.batch_size = batch_size
    config.model.update(model)
    store = open_store(store_path)
    setup = build(config, store)
    mesh = make_mesh(config.mesh)
    _, state_sharding = sharded_state_layout(config, setup, mesh)
    batch_sharding = batch_sharded(mesh)
    loader = make_loader(config, store, "train", local_data_shards(mesh))
    epoch = max(1, loader.steps_per_epoch)
    if data == "memory":
        batches = itertools.cycle([global_batch(loader.batch(i), batch_sharding) for i in range(min(n_batches, epoch))])
    else:
        _, iterate = train_batches(loader, mesh, data == "resident", config.data.device_memory_share)
        batches = itertools.chain.from_iterable(iterate(0, epoch) for _ in itertools.count())
    step = make_train_step(setup.task, setup.model, config, setup.optimizer, setup.info, state_sharding,
                           batch_sharding)
    state = create_state(setup.model, setup.optimizer, jax.random.key(0), state_sharding, setup.init_extra)
    key = jax.random.key(1)

    def run(steps: int) -> None:
        nonlocal state
        for _ in range(steps):
            state, metrics = step(state, next(batches), key)
        jax.block_until_ready(metrics)

    return run


def torch_contender(counts: list[np.ndarray], compiled: bool, bfloat16: bool, device: str,
                    **model: object) -> Callable[[int], None]:
    """`run(steps)` of the PyTorch reference step on these dense count batches, held on `device`
    (config defaults, `config.model` overridden by `model`); it waits for the device to finish."""
    import torch

    from benchmarks.torch_reference import autoencoder, make_step
    from sscell.config import default_config

    config = default_config()
    config.model.update(model)
    network = autoencoder(counts[0].shape[1], config.model.hidden, config.model.latent, config.model.dropout)
    step = make_step(network.to(device), config.train.lr, config.train.weight_decay, config.train.grad_clip,
                     config.loss.mask_rate, compiled, bfloat16)
    batches = itertools.cycle([torch.from_numpy(c).to(device) for c in counts])

    def run(steps: int) -> None:
        for _ in range(steps):
            step(next(batches))
        torch_synchronise(device)

    return run


def matmul_rates(batch_size: int, n_genes: int, width: int, device: str, frameworks: tuple[str, ...] = ("jax", "torch")
                 ) -> dict[str, Callable[[], float]]:
    """FLOP/s of one (batch x genes) @ (genes x width) matmul per framework (torch on `device`), in
    float32 and in bfloat16 operands (float32 results), best of 3 calls after a warm-up."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((batch_size, n_genes), np.float32), rng.standard_normal((n_genes, width), np.float32)
    flops = 2 * batch_size * n_genes * width

    def timed(fn: Callable[[], object]) -> float:
        fn()
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return flops / best

    rates = {}
    if "jax" in frameworks:
        import jax
        import jax.numpy as jnp

        product = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        ja, jb = jax.device_put(a), jax.device_put(b)
        ja16, jb16 = ja.astype(jnp.bfloat16), jb.astype(jnp.bfloat16)
        rates |= {"jax": lambda: timed(lambda: product(ja, jb).block_until_ready()),
                  "jax_bf16": lambda: timed(lambda: product(ja16, jb16).block_until_ready())}
    if "torch" in frameworks:
        import torch

        ta, tb = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)
        ta16, tb16 = ta.bfloat16(), tb.bfloat16()

        def product16() -> None:  # bfloat16 operands, float32 result: the step's matmul
            (ta16 @ tb16).float()
            torch_synchronise(device)

        def product32() -> None:
            ta @ tb
            torch_synchronise(device)

        rates |= {"torch": lambda: timed(product32), "torch_bf16": lambda: timed(product16)}
    return rates


def dense_counts(h5ad: Path, batch_size: int, n_batches: int) -> list[np.ndarray]:
    """Dense float32 count batches of the atlas's cells in order, wrapping around when a batch
    runs past the last cell (the PyTorch reference's input)."""
    import anndata

    x = anndata.read_h5ad(h5ad, backed="r").X
    n_cells = x.shape[0]
    batches = []
    for i in range(n_batches):
        rows = np.arange(i * batch_size, (i + 1) * batch_size) % n_cells
        batches.append(np.asarray(x[np.sort(rows)].toarray(), np.float32))
    return batches


def race(contenders: dict[str, Callable[[int], None]], matmul: dict[str, Callable[[], float]], batch_size: int,
         steps: int, rounds: int, flops: int) -> dict:
    """Cells/s of each contender and matmul FLOP/s of each framework, `rounds` times interleaved
    (a contender whose first step fails is left out, its error under "failed").

    The matmul rates are measured in this process, with the threads the contenders use, after
    each round; MFU divides a contender's model FLOP/s by the best rate over the rounds."""
    failed = {}
    for name, run in list(contenders.items()):  # compile and warm up
        try:
            run(1)
        except Exception as error:  # noqa: BLE001 - e.g. torch.compile without triton: the others still race
            failed[name] = f"{type(error).__name__}: {error}"[:1000]
            del contenders[name]
    times: dict[str, list[float]] = {name: [] for name in contenders}
    peaks: dict[str, list[float]] = {name: [] for name in matmul}
    for _ in range(rounds):
        for name, run in contenders.items():
            start = time.perf_counter()
            run(steps)
            times[name].append(time.perf_counter() - start)
        for name, rate in matmul.items():
            peaks[name].append(rate())
    rate = {name: [steps * batch_size / t for t in ts] for name, ts in times.items()}
    matmul_peak = {name: max(p) for name, p in peaks.items()}
    sscell = [name for name in contenders if name.startswith("sscell")]
    others = [name for name in contenders if name.startswith("torch")]
    reference = "sscell_bf16" if "sscell_bf16" in contenders else None
    ratios = {f"{s}_over_{o}": statistics.median(a / b for a, b in zip(rate[s], rate[o]))
              for s in sscell for o in [*others, *([reference] if reference and s != reference else [])]}
    achieved = {name: statistics.median(r) * flops for name, r in rate.items()}
    precision = {name: "_bf16" if "bf16" in name else "" for name in contenders}
    framework = {name: ("jax" if name.startswith("sscell") else "torch") + precision[name] for name in contenders}

    def share(name: str, matmuls: list[str]) -> float | None:
        measured = [matmul_peak[m] for m in matmuls if m in matmul_peak]
        return achieved[name] / max(measured) if measured else None

    return {"cells_per_s": {name: statistics.median(r) for name, r in rate.items()}, "failed": failed,
            "cells_per_s_rounds": rate, "ratios": ratios,
            "flops": {"model_flops_per_cell": flops, "achieved_flop_per_s": achieved,
                      "matmul_flop_per_s": matmul_peak,
                      "matmul_measured": "in this process after each round, with the contenders' threads; "
                                         "best of the rounds",
                      "mfu": {name: share(name, [framework[name]]) for name in contenders},
                      "mfu_vs_jax_matmul": {p.strip("_") or "float32": {name: share(name, [f"jax{p}"])
                                                                          for name in contenders}
                                            for p in ("_bf16", "")},
                      "mfu_vs_best_matmul": {name: share(name, [f"jax{precision[name]}", f"torch{precision[name]}"])
                                             for name in contenders}}}


def race_batch_size(store: Path, h5ad: Path, batch_size: int, names: list[str], n_batches: int, steps: int,
                    rounds: int, sparse_nonzeros: int = 1024, **model: object) -> dict:
    """`race` of the named contenders at one batch size (config defaults, `config.model`
    overridden by `model`; `sscell_sparse` with `sparse_nonzeros`), the PyTorch ones on
    `torch_device()`."""
    from sscell.config import default_config
    from sscell.data.store import open_store

    config = default_config().model
    config.update(model)
    genes = int(open_store(store).n_genes)
    device = torch_device() if any(n in TORCH for n in names) else "cpu"
    counts = dense_counts(h5ad, batch_size, n_batches) if any(n in TORCH for n in names) else []
    contenders = {}
    for name in names:
        if name in SSCELL:
            overrides, data = SSCELL[name]
            overrides = {**model, **overrides}
            if name == "sscell_sparse":
                overrides["sparse_nonzeros"] = sparse_nonzeros
            contenders[name] = sscell_contender(store, batch_size, n_batches, data, **overrides)
        else:
            contenders[name] = torch_contender(counts, "compile" in name, "bf16" in name, device, **model)
    frameworks = tuple(f for f in ("jax", "torch") if any(n.startswith("sscell" if f == "jax" else f) for n in names))
    result = race(contenders, matmul_rates(batch_size, genes, config.hidden[0], device, frameworks), batch_size,
                  steps, rounds, flops_per_cell(genes, tuple(config.hidden), config.latent))
    return {"torch_device": device if counts else None, **result}


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux VmHWM; unlike ru_maxrss, it is not inherited
    from the parent that forked the process)."""
    return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024


def rss_probe(store_path: str, batch_size: int, steps: int) -> dict:
    """Peak RSS (MiB) of this process after training `steps` steps on a store (config defaults)."""
    from sscell.config import default_config
    from sscell.data.store import open_store
    from sscell.training.train import train

    config = default_config()
    config.train.update(batch_size=batch_size, steps=steps, log_every=steps, val_every=steps,
                        checkpoint_every=steps)
    store = open_store(store_path)
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        train(config, workdir, store)
        seconds = time.perf_counter() - start
    return {"cells": store.n_cells, "genes": store.n_genes, "batch_size": batch_size, "steps": steps,
            "train_seconds": seconds, "peak_rss_mib": peak_rss_mib()}


def memory(store_path: Path, batch_size: int, steps: int) -> dict:
    """`rss_probe` in a fresh process, so one store's peak does not hide another's."""
    run = subprocess.run([sys.executable, "-m", "benchmarks.bench_train", "--rss-probe", str(store_path),
                          "--memory-batch-size", str(batch_size), "--memory-steps", str(steps)],
                         capture_output=True, text=True, check=False)
    if run.returncode:
        raise SscellError(f"the memory probe of {store_path} failed: {run.stderr.strip().splitlines()[-1:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_train", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where to generate (and find) the data; default: a temporary directory")
    parser.add_argument("--cells", type=int, default=12_000, help="atlas cells (batches are reused)")
    parser.add_argument("--genes", type=int, default=19_331)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[256, 1024],
                        help="one row of figures each (e.g. 1024 8192); none: skip the race")
    parser.add_argument("--batches", type=int, default=4, help="distinct in-memory batches each contender cycles")
    parser.add_argument("--steps", type=int, default=3, help="steps per contender per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sparse-nonzeros", type=int, default=1024, help="model.sparse_nonzeros of 'sscell_sparse'")
    parser.add_argument("--stall-steps", type=int, default=10, help="steps per data-stall measurement")
    parser.add_argument("--memory-cells", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--memory-genes", type=int, default=2_000)
    parser.add_argument("--memory-batch-size", type=int, default=1024)
    parser.add_argument("--memory-steps", type=int, default=50)
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=[*CONTENDERS, "train_step", "memory"])
    parser.add_argument("--default-allocator", action="store_true",
                        help="leave glibc's malloc as it is (training retains freed memory: sscell.allocator)")
    parser.add_argument("--rss-probe", help=argparse.SUPPRESS)  # internal: train on one store, print JSON
    args = parser.parse_args()
    retained = not args.default_allocator and retain_freed_memory()  # first: before any thread allocates
    with exit_on_error():
        if args.rss_probe:
            print(json.dumps(rss_probe(args.rss_probe, args.memory_batch_size, args.memory_steps)))
            return
        import jax
        import torch

        from sscell.config import default_config

        threads = len(os.sched_getaffinity(0))  # XLA's CPU thread pool uses every core it may run on
        torch.set_num_threads(threads)
        names = [name for name in CONTENDERS if name not in args.skip]
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(args.workdir or tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            h5ad, store = dataset(workdir, args.cells, args.genes)
            result = {"cells": args.cells, "genes": args.genes, "threads": {"torch": torch.get_num_threads(),
                      "xla": threads}, "torch": torch.__version__, "jax": jax.__version__,
                      "devices": str(jax.devices()), "torch_device": torch_device(),
                      "retained_freed_memory": retained,
                      "malloc_settings": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
                      "steps_per_round": args.steps, "rounds": args.rounds, "batch_sizes": {}}
            for b in args.batch_sizes:
                result["batch_sizes"][str(b)] = race_batch_size(store, h5ad, b, names, args.batches, args.steps,
                                                                args.rounds, args.sparse_nonzeros)
            if "train_step" not in args.skip:
                result["train_step"] = {str(b): train_step_rates(store, b, args.stall_steps, default_config().data.prefetch)
                                        for b in args.batch_sizes}
            if "memory" not in args.skip:
                result["memory"] = [memory(dataset(workdir, n, args.memory_genes)[1], args.memory_batch_size,
                                           args.memory_steps) for n in args.memory_cells]
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
