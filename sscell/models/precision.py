"""The compute dtype of a model: `model.dtype` "auto" is bfloat16 where the hardware multiplies
bfloat16 matrices fast, float32 elsewhere. Parameters, optimizer state and losses stay float32.
A new run's "auto" on a CPU with bfloat16 instructions is measured instead (`dtype_probe`): flags
alone do not say which is faster there."""
from __future__ import annotations

import functools
from pathlib import Path

import jax

from sscell.errors import SscellError

DTYPES = ("auto", "float32", "bfloat16")


@functools.cache
def _cpuinfo(field: str) -> str:
    """The first `field` entry of Linux /proc/cpuinfo ("" elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.split(":", 1)[0].strip() == field),
                "")


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    return frozenset(_cpuinfo("flags").split())


def cpu_model() -> str:
    """This CPU's model name (Linux /proc/cpuinfo; "unknown CPU" elsewhere)."""
    return _cpuinfo("model name") or "unknown CPU"


def cpu_has_bfloat16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AMX or AVX-512 BF16)."""
    return not cpu_flags().isdisjoint({"amx_bf16", "avx512_bf16"})


def has_bfloat16_units(device: jax.Device) -> bool:
    """Whether `device` multiplies bfloat16 matrices faster than float32 ones: TPUs, NVIDIA GPUs
    from Ampere (compute capability 8.0) on, CPUs with AMX (Intel Sapphire Rapids and later) or
    AVX-512 BF16 dot products (AMD Zen 4 and later, Intel Cooper Lake; XLA's bfloat16 matmul
    ~1.9x its float32 one and the study's train step 1.6x on 2 AMD EPYC cores: docs/performance.md)."""
    if device.platform == "tpu":
        return True
    if device.platform == "gpu":
        try:
            return float(device.compute_capability) >= 8.0
        except (AttributeError, TypeError, ValueError):  # not an NVIDIA GPU (e.g. ROCm's "gfx90a")
            return False
    return device.platform == "cpu" and cpu_has_bfloat16()


def resolve_dtype(dtype: str, device: jax.Device | None = None) -> str:
    """`dtype`, with "auto" replaced by bfloat16 or float32 for `device` (default: the first) by the
    hardware rule (`has_bfloat16_units`): a run's saved config names its dtype, settled by
    `sscell.training.resume.settle_dtype`; this rule is what runs saved before that used."""
    if dtype not in DTYPES:
        raise SscellError(f"unknown model.dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    return "bfloat16" if has_bfloat16_units(device or jax.devices()[0]) else "float32"
