#!/usr/bin/env bash
# A run on every worker of a Cloud TPU VM pod slice: the same command on each host, which
# jax.distributed.initialize() joins up from the TPU metadata (sscell/training/distributed.py).
#   launch/tpu_pod.sh TPU_NAME ZONE --config=experiments/masked_20m.py \
#     --config.data.store=/mnt/shared/store --workdir=/mnt/shared/runs/masked_20m
# Needs sscell installed on every worker, e.g. once:
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone=ZONE --worker=all \
#     --command='git clone REPO sscell && pip install -r sscell/requirements.txt -e sscell "jax[tpu]"'
# Store and workdir must be on a filesystem all workers mount (e.g. Filestore or gcsfuse).
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE ARGS...}; zone=${2:?usage: launch/tpu_pod.sh TPU_NAME ZONE ARGS...}
shift 2
args=$(printf '%q ' "$@")  # quoted once more for the remote shell
gcloud compute tpus tpu-vm ssh "${tpu}" --zone="${zone}" --worker=all \
  --command="cd sscell && python -m sscell.main ${args}"
