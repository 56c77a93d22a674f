#!/usr/bin/env bash
# Run N sscell processes on this machine as one multi-host job (exercises the multi-host path
# on a laptop or CPU box: each process reads its own slice of every global batch).
#   launch/local.sh N --config=experiments/quickstart.py [--workdir=... --config.x=y ...]
# Prepare the store first (e.g. one ordinary run, or python -m sscell.data.convert) and pass
# it as --config.data.store=STORE so the processes do not race to create it.
set -euo pipefail
n=${1:?usage: launch/local.sh N ARGS...}; shift
port=${SSCELL_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < n; i++)); do
  python -m sscell.main --coordinator_address="127.0.0.1:${port}" --num_processes="${n}" \
    --process_id="${i}" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "${pid}" || status=$?; done
exit "${status}"
