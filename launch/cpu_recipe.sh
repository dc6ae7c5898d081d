#!/usr/bin/env bash
# The CPU recipe: the quickstart's chain (hiermt/quickstart.py, preset `cpu`) with a longer budget,
# once per encoder (HPPNet first: it learns fastest at CPU sizes), on one shared corpus. Each run
# resumes where it stopped when started again.
#   launch/cpu_recipe.sh [MINUTES_PER_ENCODER (default 90)] [WORKDIR_PREFIX (default runs/cpu)]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
minutes=${1:-90}
prefix=${2:-runs/cpu}
"$PY" -m hiermt.quickstart --encoder=hppnet --minutes="$minutes" --workdir="${prefix}_hppnet"
"$PY" -m hiermt.quickstart --encoder=crnn --minutes="$minutes" --workdir="${prefix}_crnn" \
  --data_dir="${prefix}_hppnet/corpus"
