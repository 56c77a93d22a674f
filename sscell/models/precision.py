"""The compute dtype of a model: `model.dtype` "auto" is bfloat16 where the hardware multiplies
bfloat16 matrices fast, float32 elsewhere. Parameters, optimizer state and losses stay float32."""
from __future__ import annotations

import functools
from pathlib import Path

import jax

from sscell.errors import SscellError

DTYPES = ("auto", "float32", "bfloat16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in text.splitlines()
                           if line.startswith("flags")), []))


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
    return device.platform == "cpu" and not cpu_flags().isdisjoint({"amx_bf16", "avx512_bf16"})


def resolve_dtype(dtype: str, device: jax.Device | None = None) -> str:
    """`dtype`, with "auto" replaced by bfloat16 or float32 for `device` (default: the first)."""
    if dtype not in DTYPES:
        raise SscellError(f"unknown model.dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    return "bfloat16" if has_bfloat16_units(device or jax.devices()[0]) else "float32"
