"""Census path benchmark: the same cells converted from a SOMA experiment and from an .h5ad; prints JSON.

A synthetic atlas (`python -m sscell.data.synthetic`) is written as .h5ad and as a local
Census-shaped SOMA collection (sscell.data.soma.write_census_like); each is converted in its own
process under `python -X tracemalloc` (`sscell.data.convert` and `sscell.data.census`), so each
peak RSS is that run's alone. Figures per path: `cells_per_s`, `peak_rss_gb`, `traced_peak_gb`
(numpy arrays and Python objects; tiledbsoma's C++ buffers show in RSS only).

    python -m benchmarks.bench_census                          # 100 k cells x 2,000 genes
    python -m benchmarks.bench_census --cells 20000 --genes 500
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import anndata

from benchmarks.bench_store import run_module
from sscell.data.soma import write_census_like
from sscell.errors import exit_on_error


def figures(report: dict) -> dict:
    return {"cells_per_s": round(report["cells_per_s"]), "seconds": round(report["seconds"], 1),
            "peak_rss_gb": round(report["peak_rss_bytes"] / 2**30, 3),
            "traced_peak_gb": round(report["traced_peak_bytes"] / 2**30, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--genes", type=int, default=2000)
    parser.add_argument("--block-cells", type=int, default=8192)
    args = parser.parse_args()
    with exit_on_error(), tempfile.TemporaryDirectory(prefix="sscell-bench-census-") as tmp:
        work = Path(tmp)
        h5ad = work / "atlas.h5ad"
        run_module("sscell.data.synthetic", f"--output={h5ad}", f"--cells={args.cells}", f"--genes={args.genes}")
        write_census_like(anndata.read_h5ad(h5ad), str(work / "census"))
        block = f"--block-cells={args.block_cells}"
        h5ad_report = json.loads(run_module("sscell.data.convert", f"--output={work / 'h5ad_store'}", str(h5ad),
                                            block, tracemalloc=True))
        soma_report = json.loads(run_module("sscell.data.census", f"--output={work / 'soma_store'}",
                                            f"--uri={work / 'census'}", block, tracemalloc=True))
    print(json.dumps({"cells": args.cells, "genes": args.genes, "convert_h5ad": figures(h5ad_report),
                      "census_soma": figures(soma_report)}))


if __name__ == "__main__":
    main()
