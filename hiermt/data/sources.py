"""Where training material may come from, and what is reserved for held-out evaluation.

design.md §5: real MAESTRO performance MIDI from the miditok 3.1.0 sdist, music21's
bundled corpus and procedural music, rendered with the Debian SoundFonts
FluidR3_GM / TimGM6mb or pretty_midi's bundled one. Everything listed under
RESERVED_* must never reach a training or tuning path; `check_not_reserved`
is the single gate every source goes through.
"""

import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile

MIDITOK_VERSION = "3.1.0"
MIDITOK_MAESTRO = tuple(f"Maestro_{i}.mid" for i in range(1, 11))
RESERVED_MIDITOK = frozenset({"Maestro_2.mid", "Maestro_3.mid", "Maestro_7.mid", "Maestro_10.mid"})

# music21 corpus paths are matched on their lower-cased path relative to the corpus root.
RESERVED_MUSIC21_COMPOSERS = frozenset(
    {"joplin", "chopin", "schumann_clara", "beach", "schubert", "cpebach"})
RESERVED_MUSIC21_WORKS = ("mozart/k545", "bach/bwv846")

ALLOWED_SOUNDFONTS = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/TimGM6mb.sf2",
)
RESERVED_SOUNDFONT_MARK = "musescore"


class ReservedMaterialError(RuntimeError):
  """Raised when reserved evaluation material is about to be used for training."""


def check_not_reserved(path):
  """Raises ReservedMaterialError if `path` names reserved evaluation material."""
  p = str(path).replace("\\", "/").lower()
  name = os.path.basename(p)
  if RESERVED_SOUNDFONT_MARK in p:
    raise ReservedMaterialError(f"{path}: MuseScore SoundFonts are reserved for evaluation")
  if name in {r.lower() for r in RESERVED_MIDITOK}:
    raise ReservedMaterialError(f"{path}: miditok {name} is reserved for evaluation")
  if "music21" in p or "corpus" in p:
    parts = p.split("/")
    if any(c in parts for c in RESERVED_MUSIC21_COMPOSERS) or any(w in p for w in RESERVED_MUSIC21_WORKS):
      raise ReservedMaterialError(f"{path}: this music21 work is reserved for evaluation")
  return path


def soundfonts():
  """Allowed SoundFont paths present on this machine (pretty_midi's bundled one as fallback)."""
  import pretty_midi  # pylint: disable=g-import-not-at-top

  found = [p for p in ALLOWED_SOUNDFONTS if os.path.exists(p)]
  bundled = os.path.join(os.path.dirname(pretty_midi.__file__), "TimGM6mb.sf2")
  if not found and os.path.exists(bundled):
    found.append(bundled)
  return [check_not_reserved(p) for p in found]


def miditok_maestro_dir(cache_dir):
  """Unpacks the MAESTRO MIDIs of the miditok sdist into CACHE/miditok-3.1.0 (once) and returns it.

  The sdist comes from the package registry through pip; nothing else is downloaded.
  """
  cache = pathlib.Path(os.path.expanduser(cache_dir))
  out = cache / f"miditok-{MIDITOK_VERSION}"
  if all((out / n).exists() for n in MIDITOK_MAESTRO):
    return out
  cache.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache) as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
           "-d", tmp, f"miditok=={MIDITOK_VERSION}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    sdists = list(pathlib.Path(tmp).glob("miditok-*.tar.gz"))
    if res.returncode != 0 or not sdists:
      raise RuntimeError(f"could not fetch the miditok {MIDITOK_VERSION} sdist with pip: {res.stderr[-500:]}")
    staging = pathlib.Path(tmp) / "midis"
    staging.mkdir()
    with tarfile.open(sdists[0]) as tar:
      for member in tar.getmembers():
        name = os.path.basename(member.name)
        if name in MIDITOK_MAESTRO and "MIDIs_one_track" in member.name:
          with tar.extractfile(member) as src:
            (staging / name).write_bytes(src.read())
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
      for f in out.iterdir():
        f.unlink()
      out.rmdir()
    staging.rename(out)  # atomic: a half-extracted folder is never visible
  return out


def allowed_maestro_midis(cache_dir):
  """Paths of the miditok MAESTRO MIDIs that may be used for training (reserved ones excluded)."""
  root = miditok_maestro_dir(cache_dir)
  return [root / n for n in MIDITOK_MAESTRO if n not in RESERVED_MIDITOK]


def reserved_maestro_midis(cache_dir):
  """Paths of the reserved miditok MAESTRO MIDIs, for held-out evaluation only."""
  root = miditok_maestro_dir(cache_dir)
  return [root / n for n in MIDITOK_MAESTRO if n in RESERVED_MIDITOK]
