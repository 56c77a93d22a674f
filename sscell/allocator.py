"""Keep freed host memory in the process, so batches and step buffers reuse warm pages.

glibc's malloc hands large freed blocks back to the kernel (munmap, heap trimming). The loader
frees a batch of several MB on one thread after another allocated it, and XLA:CPU re-allocates
its step buffer (~350 MB at batch 1,024 and 19,331 genes) every step; each time the kernel maps
the pages in again, one minor fault per 4 KiB page, and the faults of threads serialise on the
process's memory map. `retain_freed_memory` serves every allocation from the heap (a block too
large for a thread's arena comes from the main one) and never trims it: what a run frees, it
reuses (docs/performance.md: the loader's two-thread rate from ~0.75 to ~1.0 of the raw read,
the CPU train step 1.2-1.5x the cells/s, for ~10% more peak RSS). It is what the environment
MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=... does, set from inside the running process.
"""
from __future__ import annotations

import ctypes
import functools
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters (malloc.h)
NEVER = -1  # M_TRIM_THRESHOLD: never trim (mallopt(3))


@functools.cache
def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (this process, from now on); once per
    process. Returns whether it applied: False off glibc (macOS, musl), where it does nothing."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all([mallopt(M_ARENA_MAX, 1), mallopt(M_MMAP_MAX, 0), mallopt(M_TRIM_THRESHOLD, NEVER)])
