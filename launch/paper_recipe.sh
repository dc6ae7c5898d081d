#!/usr/bin/env bash
# The paper's recipe: pretrain the encoder, then the three hierarchical stages
# (each initialised from WORKDIR/encoder), plus the Flatten baseline. Preemption stops it
# with status 75 at the stage it hit; running the same command again resumes that stage
# (stages already trained read their last checkpoint and return at once).
#   launch/paper_recipe.sh DATA_DIR WORKDIR [extra config options, e.g. encoder=hppnet,size=base] [--config.* flags]
# LAUNCH is an optional command prefix for each stage, e.g. LAUNCH="srun" inside an sbatch allocation.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: launch/paper_recipe.sh DATA_DIR WORKDIR [OPTIONS] [--config.KEY=VALUE ...]" >&2; exit 2; }
data_dir=$1; workdir=$2; shift 2
opts=""
if [ $# -gt 0 ] && [[ "$1" != --* ]]; then opts=",$1"; shift; fi
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
run() { ${LAUNCH:-} "$PY" -m hiermt.main "$@"; }
PREEMPTED=75  # hiermt.train.PREEMPTED_EXIT_CODE
for stage in encoder onset_pitch velocity offset flatten; do
  echo "=== $stage"
  status=0
  run --config="configs/base.py:${stage}${opts}" --workdir="$workdir" --config.data.data_dir="$data_dir" "$@" \
    || status=$?
  if [ "$status" -eq "$PREEMPTED" ]; then
    # Never go on to the next stage with a half-trained one.
    echo "=== $stage was preempted after saving a checkpoint: run this command again to resume it" >&2
    exit "$status"
  elif [ "$status" -ne 0 ]; then
    exit "$status"
  fi
done
