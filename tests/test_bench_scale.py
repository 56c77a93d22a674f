"""bench_scale at a tiny size: every part runs and reports what docs/scale.md reads."""
import json
import subprocess
import sys

import numpy as np

from benchmarks.bench_scale import ScaleAtlas, write_store
from sscell.data.store import open_store


def test_generator_streams_distinct_sorted_cells_into_a_store(tmp_path):
    atlas = ScaleAtlas(1000, n_genes=400, seed=3, pool_cells=300)
    rows = atlas.rows(0, 1000)
    lengths = np.diff(rows.indptr)
    assert rows.has_sorted_indices and lengths.min() >= 1 and rows.indices.max() < 400
    assert (np.diff(rows.indices.astype(int))[np.diff(np.repeat(np.arange(1000), lengths)) == 0] > 0).all()
    np.testing.assert_array_equal(rows[300:700].toarray(), atlas.rows(300, 700).toarray())  # any range, same cells
    write_store(tmp_path / "store", atlas)
    store = open_store(tmp_path / "store")
    assert (store.n_cells, store.n_genes) == (1000, 400)
    assert [int(np.diff(store.split_range(s))[0]) for s in ("train", "val", "test")] == [700, 150, 150]
    np.testing.assert_array_equal(store.read_rows(0, 1000).toarray(), rows.toarray())


def test_bench_scale_tiny_run_reports_every_part(tmp_path):
    out = tmp_path / "scale.json"
    subprocess.run([sys.executable, "-m", "benchmarks.bench_scale", "--workdir", str(tmp_path), "--sizes", "3000",
                    "--convert-sizes", "3000", "--genes", "300", "--pool-cells", "512", "--batch-size", "64",
                    "--threads", "1", "--read-cells", "256", "--rounds", "1", "--train-steps", "2",
                    "--resident-cells", "500", "--knn-refs", "2000", "--knn-queries", "300",
                    "--bucket-read-cells", "128", "--evict", "fadvise", "--in-process", "--out", str(out),
                    "--plot", str(tmp_path / "scale.png")], check=True, capture_output=True, text=True)
    result = json.loads(out.read_text())
    size = result["sizes"]["3000"]
    assert "peak_disk_bytes" in size["build"] and 0 < size["build"]["bytes_per_cell"] < 20_000
    assert size["build"]["nonzeros_per_cell"] == (300 - 64) // 2  # few genes: half of those a run may shift over
    loader = size["loader"]["1"]
    assert loader["cache_drop"] == "fadvise" and loader["cores"] == 1
    for key in ("loader_cold", "loader_warm", "raw_cold", "loader_deep_cold"):
        assert loader[f"{key}_cells_per_s"] > 0
    assert loader["disk"]["best_cells_per_s"] > 0 and loader["loader_cold_over_disk"] > 0
    assert result["convert"]["3000"]["how"] == "convert" and result["convert"]["3000"]["cells_per_s"] > 0
    assert 0 <= result["train"]["waiting_share"] < 1 and result["train"]["streamed_steps_per_s"] > 0
    assert result["device_resident"][0]["bytes_per_million_cells"] > 0
    knn = result["knn"]["2000"]
    assert knn["exact"]["seconds"] > 0 and knn["approximate"]["peak_rss_bytes"] > 0
    assert knn["approximate_label_agreement"] > 0.9 and knn["approximate_neighbour_recall"] > 0.8
    assert result["bucket"].get("skipped") or result["bucket"]["s3_cells_per_s"]["1"] > 0
    assert (tmp_path / "scale.png").stat().st_size > 0
