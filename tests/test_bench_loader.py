"""bench_loader's codec comparison: raw reads and the loader measured on the same pinned cores."""
import os
import platform

import pytest

from benchmarks.bench_loader import codec_rates


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="pinning needs Linux and two cores")
def test_codec_rates_pin_raw_and_loader_to_the_thread_count(tiny_store):
    """t threads means t cores and t tensorstore decode threads for both (tensorstore decoded on
    every core, so a "1-thread" raw read used them all); the rates come from that process, once
    with freed memory retained as training runs and once with glibc's defaults."""
    result = codec_rates(tiny_store.path, batch_size=32, cells=64, threads=[1, 2], rounds=2)
    assert result["x_bytes_per_cell"] > 0
    for t, retained in result["threads"].items():
        default = retained["default_allocator"]
        assert retained["retained_freed_memory"] == (platform.libc_ver()[0] == "glibc")
        assert not default["retained_freed_memory"]
        for probe in (retained, default):
            assert probe["cores"] == probe["tensorstore_threads"] == probe["prefetch_threads"] == int(t)
            assert probe["raw_cells_per_s"] > 0 and probe["loader_cells_per_s"] > 0
            assert probe["loader_over_raw"] == pytest.approx(probe["loader_cells_per_s"] / probe["raw_cells_per_s"])
            assert 0 < probe["raw_cores_busy"] <= int(t) + 0.2  # pinned: never more than its cores
