#!/usr/bin/env bash
# The paper's recipe: pretrain the encoder, then the three hierarchical stages
# (each initialised from WORKDIR/encoder), plus the Flatten baseline.
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
for stage in encoder onset_pitch velocity offset flatten; do
  echo "=== $stage"
  run --config="configs/base.py:${stage}${opts}" --workdir="$workdir" --config.data.data_dir="$data_dir" "$@"
done
