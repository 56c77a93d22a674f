"""`model.dtype` "auto" for a new run on a CPU with bfloat16 instructions: both dtypes timed.

AVX-512 BF16 or AMX says that a CPU can multiply bfloat16 matrices, not that XLA's bfloat16 step
beats its float32 one there: an Intel Xeon with AVX-512 BF16 and no AMX trained 1.46x faster in
float32, an AMD Zen 4 1.5x faster in bfloat16. So "auto" there times the autoencoder's forward and
backward pass at the run's widths (at most `PROBE_ROWS` cells a step) in both dtypes, about two
seconds with compilation at the quickstart's shapes on a quiet machine, and keeps the faster. The
timings are cached per CPU (model, flags, cores), jax version and shapes in
$XDG_CACHE_HOME/sscell/dtype_probe.json (default ~/.cache); a cache file that does not parse is
ignored and rewritten. Accelerators keep the hardware rule (`precision.has_bfloat16_units`) and
CPUs without bfloat16 instructions stay float32, unmeasured.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sscell.atomic import atomic_file
from sscell.models.mlp import Autoencoder, init_params
from sscell.models.precision import cpu_flags, cpu_has_bfloat16, cpu_model, resolve_dtype

MEASURED = ("bfloat16", "float32")
PROBE_ROWS = 512  # cells per timed step at most: the study's 8,192 x 19,331 genes takes seconds a step
MARGIN = 1.05  # bfloat16 only when this much faster: float32 is exact, and timings swing by a few percent
CACHE_NAME = "dtype_probe.json"


@dataclasses.dataclass(frozen=True)
class Shapes:
    """What the probe times: `rows` cells through an autoencoder of these widths."""

    rows: int
    n_genes: int
    hidden: tuple[int, ...]
    latent: int
    activation: str
    norm: str

    @classmethod
    def of(cls, model_config, batch_size: int, n_genes: int) -> Shapes:
        """A run's shapes: its batch (at most `PROBE_ROWS` cells: the same on any number of devices, so
        that one process and several choose alike), genes and `model` section."""
        rows = max(1, min(PROBE_ROWS, batch_size))
        return cls(rows, n_genes, tuple(model_config.hidden), int(model_config.latent), model_config.activation,
                   model_config.norm)

    def key(self) -> str:
        """The cache key: this host's CPU, cores and jax version, and the shapes."""
        flags = hashlib.sha1(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:12]
        return (f"{cpu_model()} flags {flags} cores {os.cpu_count()} jax {jax.__version__} "
                f"{self.rows}x{self.n_genes} hidden {list(self.hidden)} latent {self.latent} {self.activation} "
                f"norm {self.norm}")


@dataclasses.dataclass(frozen=True)
class Choice:
    """The dtype "auto" resolved to, and the timings that chose it (None: the hardware rule)."""

    dtype: str
    ms: dict[str, float] | None = None  # ms per step by dtype
    cached: bool = False

    def describe(self) -> str:
        if self.ms is None:
            return f"model.dtype auto -> {self.dtype} (not measured: {jax.devices()[0].device_kind})"
        timings = ", ".join(f"{'bf16' if d == 'bfloat16' else 'f32'} {self.ms[d]:.2f} ms/step" for d in MEASURED)
        return (f"model.dtype auto -> {self.dtype} ({'cached' if self.cached else 'measured'}: {timings} on "
                f"{cpu_model()}; {cache_file()})")


def faster_dtype(ms: dict[str, float]) -> str:
    """bfloat16 if its step is `MARGIN` times faster than float32's, else float32."""
    return "bfloat16" if ms["bfloat16"] * MARGIN < ms["float32"] else "float32"


def _step(shapes: Shapes, dtype: str) -> Callable[[], None]:
    """One forward and backward pass of the autoencoder in `dtype` (compiled on first call), waited for."""
    model = Autoencoder(shapes.n_genes, shapes.hidden, shapes.latent, shapes.activation, 0.0, shapes.norm, dtype)
    rng = np.random.default_rng(0)  # values do not matter to the time: no initialiser is run
    params = jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.05, p.shape).astype(np.float32)),
                          jax.eval_shape(lambda key: init_params(model, key), jax.random.key(0)))
    x = jnp.asarray(rng.random((shapes.rows, shapes.n_genes), np.float32))

    @jax.jit
    def grad(params, x):
        return jax.grad(lambda p: jnp.mean((model.apply({"params": p}, x)[0] - x) ** 2))(params)

    return lambda: jax.block_until_ready(grad(params, x))


def measure(shapes: Shapes, budget_s: float = 0.6) -> dict[str, float]:
    """ms per step of each dtype: the fastest of a first step after compilation and, when steps are
    short, of up to 3 rounds of blocks filling about `budget_s`, the dtypes interleaved so that a
    load swing on the machine hits both."""
    steps = {dtype: _step(shapes, dtype) for dtype in MEASURED}
    best = {}
    for dtype, step in steps.items():
        step()  # compiles
        started = time.perf_counter()
        step()
        best[dtype] = time.perf_counter() - started
    first = dict(best)
    for _ in range(min(3, int(budget_s / sum(first.values())))):
        for dtype, step in steps.items():
            repeats = max(1, math.ceil(budget_s / 6 / first[dtype]))
            started = time.perf_counter()
            for _ in range(repeats):
                step()
            best[dtype] = min(best[dtype], (time.perf_counter() - started) / repeats)
    return {dtype: seconds * 1e3 for dtype, seconds in best.items()}


def cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sscell" / CACHE_NAME


def _entries(path: Path) -> dict:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, unreadable or corrupt: measured again, rewritten
        return {}
    return entries if isinstance(entries, dict) else {}


def cached_timings(path: Path, key: str) -> dict[str, float] | None:
    """The timings cached under `key` in `path`, if it holds a valid entry."""
    entry = _entries(path).get(key)
    if not isinstance(entry, dict) or not all(isinstance(entry.get(d), (int, float)) and entry[d] > 0
                                              for d in MEASURED):
        return None
    return {d: float(entry[d]) for d in MEASURED}


def cache_timings(path: Path, key: str, ms: dict[str, float]) -> None:
    """Add `ms` under `key` to the cache file (atomically; a cache that cannot be written is skipped)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps({**_entries(path), key: ms}, indent=1, sort_keys=True) + "\n")
    except OSError:
        pass  # a read-only home: the next run measures again


def auto_dtype(model_config, batch_size: int, n_genes: int) -> Choice:
    """What "auto" is for a new run of `model_config` at `batch_size` cells over `n_genes` genes on
    this machine's first device: measured on a CPU with bfloat16 instructions (cached), else the
    hardware rule."""
    device = jax.devices()[0]
    if device.platform != "cpu":
        return Choice(resolve_dtype("auto", device))
    if not cpu_has_bfloat16():
        return Choice("float32")
    shapes, path = Shapes.of(model_config, batch_size, n_genes), cache_file()
    key = shapes.key()
    ms = cached_timings(path, key)
    if ms is not None:
        return Choice(faster_dtype(ms), ms, cached=True)
    ms = measure(shapes)
    cache_timings(path, key, ms)
    return Choice(faster_dtype(ms), ms)
