"""One-shot accelerator check: environment, train-step race, loader threads, data stall (streamed
and device-resident) and a short real run of experiments/masked_20m.py; writes one JSON.

Made for a lent machine with one GPU, no network and a few minutes (under 8 at full size):

    python -m benchmarks.gpu_check --out=gpu_check.json          # 19,331 genes, batches 1,024 and 8,192
    python -m benchmarks.gpu_check --dry                          # the same code paths, tiny, on CPU
    bash benchmarks/gpu_check.sh WHEELS_DIR                       # first installs the missing packages

Sections: `environment` (versions, devices, memory); `train_step` (`bench_train`'s race per batch
size: sscell in bfloat16 and float32 on in-memory batches and bfloat16 on device-resident ones,
the PyTorch reference on the same device; cells/s, ratios, MFU); `loader` (host loader cells/s
per prefetch thread count); `stall` (steps/s fed one in-memory batch vs the streamed loader and vs device-resident data:
`bench_loader.train_step_rates`); `main_run` (`python -m sscell.main` on the generated store for
a few hundred steps, then its evaluation: wall time, last train and validation metrics, result
files). The JSON is rewritten after every section, and a failed section records its error and
the check goes on, so a timeout still leaves what was measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks.bench_loader import sscell_rates, train_step_rates
from benchmarks.bench_train import race_batch_size
from sscell.allocator import retain_freed_memory
from sscell.errors import exit_on_error

# (cells, genes) of the generated store and the sizes of each section.
FULL = dict(cells=60_000, genes=19_331, batch_sizes=(1024, 8192), race_steps=10, race_rounds=2,
            contenders=("sscell_bf16", "sscell_float32", "sscell_bf16_resident", "torch_eager", "torch_compile",
                        "torch_compile_bf16"), threads=(4, 8, 16),
            read_cells=60_000, loader_batch=1024, stall_batch=8192, stall_steps=20, main_steps=300, main_batch=8192,
            model={})
DRY = dict(cells=1_200, genes=200, batch_sizes=(64,), race_steps=2, race_rounds=1,
           contenders=("sscell_bf16", "sscell_float32", "sscell_bf16_resident", "torch_eager"), threads=(1, 2),
           read_cells=256,
           loader_batch=32, stall_batch=64, stall_steps=2, main_steps=6, main_batch=64,
           model=dict(hidden=(32, 32), latent=8))
EVAL_TASKS = ("knn", "linear_probe", "reconstruction")  # no scib-metrics / umap-learn wheels needed


def environment() -> dict:
    """Versions, devices and their memory, and the GPU as nvidia-smi describes it."""
    import jax

    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False) if _on_path("nvidia-smi") else None
    return {"python": platform.python_version(), "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
            "device_memory_bytes": [(d.memory_stats() or {}).get("bytes_limit") for d in jax.devices()],
            "nvidia_smi": smi.stdout.strip() if smi else None}


def _on_path(program: str) -> bool:
    return any(os.access(os.path.join(p, program), os.X_OK) for p in os.environ.get("PATH", "").split(os.pathsep))


def train_step(store: Path, h5ad: Path, batch_sizes: tuple[int, ...], contenders: tuple[str, ...], steps: int,
               rounds: int, overrides: dict) -> dict:
    """`bench_train.race_batch_size` per batch size: sscell's step in bfloat16 and float32 on
    in-memory batches and bfloat16 on device-resident ones, the PyTorch reference on the same
    device; cells/s, ratios, MFU against matmuls measured in the same process."""
    return {str(b): race_batch_size(store, h5ad, b, list(contenders), 2, steps, rounds, **overrides)
            for b in batch_sizes}


def main_run(store: Path, workdir: Path, steps: int, batch_size: int, model: dict) -> dict:
    """`python -m sscell.main --config=experiments/masked_20m.py` on the store: training, then evaluation."""
    repo = Path(__file__).resolve().parents[1]
    overrides = [f"--config.data.store={store}", f"--config.train.steps={steps}",
                 f"--config.train.batch_size={batch_size}", f"--config.train.val_every={steps}",
                 f"--config.train.checkpoint_every={steps}", "--config.data.device_resident=auto",
                 f"--config.eval.tasks={EVAL_TASKS!r}".replace(" ", ""),
                 *(f"--config.model.{name}={value!r}".replace(" ", "") for name, value in model.items())]
    command = [sys.executable, "-m", "sscell.main", f"--config={repo / 'experiments' / 'masked_20m.py'}",
               f"--workdir={workdir}", *overrides]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=repo)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()] \
        if (workdir / "metrics.jsonl").exists() else []
    return {"command": " ".join(command[1:]), "returncode": done.returncode, "wall_s": time.perf_counter() - start,
            "last_metrics": records[-1] if records else None,
            "results_md": (workdir / "results.md").read_text()[:3000] if (workdir / "results.md").exists() else None,
            "output_tail": (done.stdout + done.stderr)[-3000:]}


def check(out: Path, workdir: Path, dry: bool) -> dict:
    """Every section in turn, the JSON at `out` rewritten after each."""
    from benchmarks.bench_loader import dataset

    sizes = DRY if dry else FULL
    report: dict = {"dry": dry, "sizes": sizes}

    def section(name: str, measure) -> None:
        start = time.perf_counter()
        try:
            report[name] = measure()
        except Exception as error:  # noqa: BLE001 - one failed section must not lose the others
            report[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
        report.setdefault("seconds", {})[name] = time.perf_counter() - start
        out.write_text(json.dumps(report, indent=1, default=str))
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr)

    section("environment", environment)
    paths = {}
    section("data", lambda: {"store": str(paths.setdefault(
        "data", dataset(workdir, sizes["cells"], sizes["genes"]))[1])})
    if "data" not in paths:
        return report
    h5ad, store = paths["data"]
    section("train_step", lambda: train_step(store, h5ad, sizes["batch_sizes"], sizes["contenders"],
                                             sizes["race_steps"], sizes["race_rounds"], sizes["model"]))
    section("loader", lambda: {"batch_size": sizes["loader_batch"], "cells_per_s": sscell_rates(
        store, sizes["loader_batch"], sizes["read_cells"], list(sizes["threads"]))})
    section("stall", lambda: {source: train_step_rates(store, sizes["stall_batch"], sizes["stall_steps"],
                                                       max(sizes["threads"]), source == "resident",
                                                       **sizes["model"])
                              for source in ("streamed", "resident")})
    section("main_run", lambda: main_run(store, workdir / "run", sizes["main_steps"], sizes["main_batch"],
                                                   sizes["model"]))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="tiny sizes, any device: checks the code paths")
    parser.add_argument("--out", default="gpu_check.json", help="the JSON to write")
    parser.add_argument("--workdir", help="where to generate (and find) the data and run; default: a temporary one")
    args = parser.parse_args()
    retain_freed_memory()  # as training runs (sscell.allocator)
    with exit_on_error(), tempfile.TemporaryDirectory(prefix="sscell-gpu-check-") as temporary:
        workdir = Path(args.workdir or temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        report = check(Path(args.out), workdir, args.dry)
    failed = [name for name, value in report.items() if isinstance(value, dict) and "error" in value]
    if report.get("main_run", {}).get("returncode"):
        failed.append("main_run")
    print(f"wrote {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
