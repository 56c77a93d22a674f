"""Train-step benchmark: sscell's masked autoencoder step against the same model and loss in plain
PyTorch (eager and torch.compile), model FLOPs utilisation, data stall and training memory; prints
one JSON object.

Same data, same process, same threads: a synthetic atlas (`--cells` x `--genes`, ~92% zeros)
converted into a store; sscell trains on its loader's batches and PyTorch on dense float32
counts of the same atlas, both held in memory and reused. Each round times `--steps` steps of
every contender back to back, so a ratio compares neighbours in time on a noisy machine; the
figures are medians over `--rounds` rounds.

    pip install -e ".[bench]"   # torch: pip install torch --index-url https://download.pytorch.org/whl/cpu
    python -m benchmarks.bench_train --workdir=/tmp/bench   # keep (and reuse) the generated data

Figures, per batch size: `cells_per_s` of sscell (the real `make_train_step`, config defaults)
with `model.dtype` bfloat16 and float32, sscell float32 with `model.sparse_nonzeros` set, torch
eager and torch.compile (float32, the reference) and torch.compile under bfloat16 autocast;
`ratios` of each sscell to each torch contender (median of per-round ratios); `flops`: the
model's matmul FLOPs per cell (2*m*n*k per layer, x3 for forward and backward), the FLOP/s each
contender achieved and its share of a (batch x genes) @ (genes x 512) matmul in its precision
(bfloat16 operands for the *_bf16 contenders) measured in the same round by the same framework
(`mfu`) and by the faster of the two (`mfu_vs_best_matmul`). `train_step`: the
in-memory vs real-loader steps/s of `bench_loader` (data stall). `memory`: peak RSS (ru_maxrss)
(VmHWM) of a training process, a fresh one per store size (`--memory-cells` x `--memory-genes`).
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
from sscell.errors import SscellError, exit_on_error

CONTENDERS = ("sscell_bf16", "sscell_float32", "sscell_sparse", "torch_eager", "torch_compile", "torch_compile_bf16")


def flops_per_cell(n_genes: int, hidden: tuple[int, ...], latent: int) -> int:
    """Matmul FLOPs of one cell's forward and backward pass: 3 x sum over layers of 2 * fan_in * fan_out."""
    widths = (n_genes, *hidden, latent, *reversed(hidden), n_genes)
    return 3 * sum(2 * a * b for a, b in itertools.pairwise(widths))


def sscell_contender(store_path: Path, batch_size: int, n_batches: int, **model: object) -> Callable[[int], None]:
    """`run(steps)` of sscell's train step (config defaults, `config.model` overridden by `model`)
    on `n_batches` loader batches held on the device."""
    import jax

    from sscell.config import default_config
    from sscell.data.store import open_store
    from sscell.training.mesh import batch_sharded, global_batch, local_data_shards, make_mesh
    from sscell.training.state import create_state
    from sscell.training.step import make_train_step
    from sscell.training.train import build, make_loader, sharded_state_layout

    config = default_config()
    config.train.batch_size = batch_size
    config.model.update(model)
    store = open_store(store_path)
    setup = build(config, store)
    mesh = make_mesh(config.mesh)
    _, state_sharding = sharded_state_layout(config, setup, mesh)
    batch_sharding = batch_sharded(mesh)
    loader = make_loader(config, store, "train", local_data_shards(mesh))
    batches = itertools.cycle([global_batch(loader.batch(i), batch_sharding) for i in range(n_batches)])
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


def torch_contender(counts: list[np.ndarray], compiled: bool, bfloat16: bool) -> Callable[[int], None]:
    """`run(steps)` of the PyTorch reference step on these dense count batches (in memory)."""
    import torch

    from benchmarks.torch_reference import autoencoder, make_step
    from sscell.config import default_config

    config = default_config()
    model = autoencoder(counts[0].shape[1], config.model.hidden, config.model.latent, config.model.dropout)
    step = make_step(model, config.train.lr, config.train.weight_decay, config.train.grad_clip,
                     config.loss.mask_rate, compiled, bfloat16)
    batches = itertools.cycle([torch.from_numpy(c) for c in counts])

    def run(steps: int) -> None:
        for _ in range(steps):
            step(next(batches))

    return run


def matmul_rates(batch_size: int, n_genes: int, width: int) -> dict[str, Callable[[], float]]:
    """FLOP/s of one (batch x genes) @ (genes x width) matmul per framework, in float32 and in
    bfloat16 (float32 results)."""
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((batch_size, n_genes), np.float32), rng.standard_normal((n_genes, width), np.float32)
    ja, jb, ta, tb = jax.device_put(a), jax.device_put(b), torch.from_numpy(a), torch.from_numpy(b)
    ja16, jb16, ta16, tb16 = ja.astype(jnp.bfloat16), jb.astype(jnp.bfloat16), ta.bfloat16(), tb.bfloat16()
    product = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    flops = 2 * batch_size * n_genes * width

    def timed(fn: Callable[[], object]) -> float:
        fn()
        start = time.perf_counter()
        fn()
        return flops / (time.perf_counter() - start)

    return {"jax": lambda: timed(lambda: product(ja, jb).block_until_ready()), "torch": lambda: timed(lambda: ta @ tb),
            "jax_bf16": lambda: timed(lambda: product(ja16, jb16).block_until_ready()),
            "torch_bf16": lambda: timed(lambda: (ta16 @ tb16).float())}


def dense_counts(h5ad: Path, batch_size: int, n_batches: int) -> list[np.ndarray]:
    """Dense float32 count batches of the atlas's first cells (the PyTorch reference's input)."""
    import anndata

    x = anndata.read_h5ad(h5ad, backed="r").X
    return [np.asarray(x[i * batch_size:(i + 1) * batch_size].toarray(), np.float32) for i in range(n_batches)]


def race(contenders: dict[str, Callable[[int], None]], matmul: dict[str, Callable[[], float]], batch_size: int,
         steps: int, rounds: int, flops: int) -> dict:
    """Cells/s of each contender and matmul FLOP/s of each framework, `rounds` times interleaved."""
    for run in contenders.values():  # compile and warm up
        run(1)
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
    ratios = {f"{s}_over_{o}": statistics.median(a / b for a, b in zip(rate[s], rate[o]))
              for s in sscell for o in others}
    achieved = {name: statistics.median(r) * flops for name, r in rate.items()}
    precision = {name: "_bf16" if name.endswith("bf16") else "" for name in contenders}
    framework = {name: ("jax" if name.startswith("sscell") else "torch") + precision[name] for name in contenders}
    return {"cells_per_s": {name: statistics.median(r) for name, r in rate.items()},
            "cells_per_s_rounds": rate, "ratios": ratios,
            "flops": {"model_flops_per_cell": flops, "achieved_flop_per_s": achieved,
                      "matmul_flop_per_s": matmul_peak,
                      "mfu": {name: achieved[name] / matmul_peak[framework[name]] for name in contenders},
                      "mfu_vs_best_matmul": {name: achieved[name] / max(matmul_peak[f"jax{precision[name]}"],
                                                                        matmul_peak[f"torch{precision[name]}"])
                                             for name in contenders}}}


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
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[256, 1024], help="none: skip the race")
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
    parser.add_argument("--rss-probe", help=argparse.SUPPRESS)  # internal: train on one store, print JSON
    args = parser.parse_args()
    with exit_on_error():
        if args.rss_probe:
            print(json.dumps(rss_probe(args.rss_probe, args.memory_batch_size, args.memory_steps)))
            return
        import jax
        import torch

        from sscell.config import default_config

        threads = len(os.sched_getaffinity(0))  # XLA's CPU thread pool uses every core it may run on
        torch.set_num_threads(threads)
        model = default_config().model
        flops = flops_per_cell(args.genes, tuple(model.hidden), model.latent)
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(args.workdir or tmp)
            workdir.mkdir(parents=True, exist_ok=True)
            h5ad, store = dataset(workdir, args.cells, args.genes)
            result = {"cells": args.cells, "genes": args.genes, "threads": {"torch": torch.get_num_threads(),
                      "xla": threads}, "torch": torch.__version__, "jax": jax.__version__,
                      "devices": str(jax.devices()), "steps_per_round": args.steps, "rounds": args.rounds,
                      "batch_sizes": {}}
            for b in args.batch_sizes:
                counts = dense_counts(h5ad, b, args.batches)
                sscell_models = {"sscell_bf16": {"dtype": "bfloat16"}, "sscell_float32": {"dtype": "float32"},
                                 "sscell_sparse": {"dtype": "float32", "sparse_nonzeros": args.sparse_nonzeros}}
                contenders = {name: sscell_contender(store, b, args.batches, **sscell_models[name])
                              if name.startswith("sscell") else torch_contender(counts, "compile" in name, "bf16" in name)
                              for name in CONTENDERS if name not in args.skip}
                result["batch_sizes"][str(b)] = race(contenders, matmul_rates(b, args.genes, model.hidden[0]), b,
                                                     args.steps, args.rounds, flops)
            if "train_step" not in args.skip:
                result["train_step"] = {str(b): train_step_rates(store, b, args.stall_steps, default_config().data.prefetch)
                                        for b in args.batch_sizes}
            if "memory" not in args.skip:
                result["memory"] = [memory(dataset(workdir, n, args.memory_genes)[1], args.memory_batch_size,
                                           args.memory_steps) for n in args.memory_cells]
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
