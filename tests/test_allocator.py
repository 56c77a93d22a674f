"""`retain_freed_memory`: after it, a large block freed and allocated again reuses the process's
pages (no minor faults), where glibc's defaults hand it back to the kernel and fault it in anew;
also for blocks above 2 GiB (XLA's step buffer at batch 8,192) and blocks of worker threads."""
import platform
import subprocess
import sys

import pytest

FAULTS_PER_REALLOCATION = """
import concurrent.futures, resource, sys
import numpy as np
from sscell.allocator import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
elements = int(sys.argv[2]) // 8

def allocate_and_free() -> None:
    block = np.ones(elements)  # written: every page faulted in unless reused
    del block

with concurrent.futures.ThreadPoolExecutor(1) as worker:  # as the loader's and XLA's threads
    worker.submit(allocate_and_free).result()  # once before counting
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        worker.submit(allocate_and_free).result()
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


def faults_per_reallocation(mode: str, nbytes: int) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_REALLOCATION, mode, str(nbytes)], capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
@pytest.mark.parametrize("nbytes", [2**27, pytest.param(5 * 2**29, marks=pytest.mark.slow)])  # 128 MiB, 2.5 GiB
def test_retained_memory_is_reused_without_page_faults(nbytes):
    applied, retained = faults_per_reallocation("retain", nbytes)
    default_applied, default = faults_per_reallocation("default", nbytes)
    assert applied and not default_applied
    assert default >= nbytes / 2**22  # mapped in again: at least a fault per 4 MiB, even with huge pages
    assert retained < default / 10
