#!/usr/bin/env bash
# Sets up a fresh machine: Debian packages (FluidSynth, SoundFonts, tcmalloc), a Python 3.12
# virtual environment in .venv with hiermt installed editable. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"

need_apt=()
command -v fluidsynth >/dev/null 2>&1 || need_apt+=(fluidsynth)
[ -f /usr/share/sounds/sf2/FluidR3_GM.sf2 ] || need_apt+=(fluid-soundfont-gm)
[ -f /usr/share/sounds/sf2/TimGM6mb.sf2 ] || need_apt+=(timgm6mb-soundfont)
ls /usr/lib/*/libtcmalloc_minimal.so.4 >/dev/null 2>&1 || need_apt+=(libtcmalloc-minimal4)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# JAX >= 0.12 and librosa 1.x need Python >= 3.12; pyenv installs are searched too.
PY=""
for cand in python3.13 python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
    PY="$cand"; break
  fi
done
[ -n "$PY" ] || { echo "install.sh: no Python >= 3.12 found (install python3.12)" >&2; exit 1; }

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[test]"
echo "install.sh: ready ($(.venv/bin/python --version))"
