"""`retain_freed_memory`: after it, a large block freed and allocated again reuses the process's
pages (no minor faults), where glibc's defaults hand it back to the kernel and fault it in anew."""
import platform
import subprocess
import sys

import pytest

FAULTS_PER_REALLOCATION = """
import resource, sys
import numpy as np
from sscell.allocator import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
np.ones(2**24)  # 128 MiB: allocated, written and freed once before counting
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    block = np.ones(2**24)
    del block
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def faults_per_reallocation(mode: str) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_REALLOCATION, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_retained_memory_is_reused_without_page_faults():
    applied, retained = faults_per_reallocation("retain")
    default_applied, default = faults_per_reallocation("default")
    assert applied and not default_applied
    assert default >= 32  # 128 MiB mapped in again: at least one fault per 4 MiB, even with huge pages
    assert retained < default / 10
