#!/usr/bin/env bash
# The accelerator check on a machine without network: install the packages it lacks from a
# folder of wheels (docs/performance.md, "GPU"), then run `python -m benchmarks.gpu_check`.
#   bash benchmarks/gpu_check.sh WHEELS_DIR [gpu_check args...]     e.g. --out=gpu_check.json
set -euo pipefail
wheels="${1:?usage: bash benchmarks/gpu_check.sh WHEELS_DIR [gpu_check args...]}"
shift
cd "$(dirname "$0")/.."
missing=$(python - <<'PY'
import importlib.util
need = {"anndata": "anndata", "zarr": "zarr", "ml_collections": "ml_collections", "tensorboardX": "tensorboardX",
        "tqdm": "tqdm", "safetensors": "safetensors", "matplotlib": "matplotlib"}
print(" ".join(pkg for module, pkg in need.items() if importlib.util.find_spec(module) is None))
PY
)
if [ -n "$missing" ]; then
  python -m pip install --quiet --no-index --find-links="$wheels" $missing
fi
exec python -m benchmarks.gpu_check "$@"
