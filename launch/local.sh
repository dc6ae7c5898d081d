#!/usr/bin/env bash
# Runs N hiermt processes on this host as one multi-process JAX job (for testing
# the multi-host path without a cluster). Each process gets its own CPU devices.
#   launch/local.sh N --config=configs/base.py:encoder,runlocal --workdir=DIR [more flags]
# Environment: DEVICES_PER_PROCESS (default 4, forced CPU devices), PORT (default 12355).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: launch/local.sh N [hiermt.main flags]" >&2; exit 2; }
n=$1; shift
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
port=${PORT:-12355}
pids=()
for ((i = 0; i < n; i++)); do
  HIERMT_COORDINATOR="127.0.0.1:${port}" HIERMT_NUM_PROCESSES="$n" HIERMT_PROCESS_ID="$i" \
  JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-4}" \
    "$PY" -m hiermt.main "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
