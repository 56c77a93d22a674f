"""`python -m benchmarks.gpu_check --dry` runs every section of the accelerator check on CPU at
tiny sizes, so the script a lent GPU machine runs cannot rot unnoticed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_dry_gpu_check_completes_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry", f"--out={out}",
                           f"--workdir={tmp_path / 'work'}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=540)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert not [name for name, value in report.items() if isinstance(value, dict) and "error" in value]
    assert report["environment"]["backend"] == "cpu"
    race = report["train_step"]["64"]
    assert race["torch_device"] == "cpu"  # the PyTorch reference runs where jax does
    assert set(race["cells_per_s"]) == {"sscell_bf16", "sscell_float32", "sscell_bf16_resident", "torch_eager"}
    assert all(rate > 0 for rate in race["cells_per_s"].values())
    assert all(share > 0 for share in race["flops"]["mfu"].values())
    assert all(share > 0 for shares in race["flops"]["mfu_vs_jax_matmul"].values() for share in shares.values())
    assert set(report["loader"]["cells_per_s"]) == {"1", "2"}
    assert report["stall"]["resident"]["data"] == "device_resident"
    assert report["stall"]["streamed"]["data"] == "streamed"
    run = report["main_run"]
    assert run["returncode"] == 0 and run["last_metrics"]["step"] == 6 and "val/loss" in run["last_metrics"]
    assert "knn" in run["results_md"]
