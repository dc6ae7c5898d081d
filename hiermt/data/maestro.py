"""The MAESTRO v3 index: pieces, splits and file paths of a MAESTRO-layout folder.

A MAESTRO-layout folder holds `maestro-v3.0.0.csv` (or the column-oriented
`maestro-v3.0.0.json`) next to year folders of `.midi` + audio pairs. Real
MAESTRO and the corpora of `hiermt.data.synth` share this layout, so everything
downstream reads data through `load_index` / `pieces`.
"""

import csv
import dataclasses
import json
import os

from hiermt import atomic_file

CSV_NAME = "maestro-v3.0.0.csv"
JSON_NAME = "maestro-v3.0.0.json"
SPLITS = ("train", "validation", "test")
FIELDS = ("canonical_composer", "canonical_title", "split", "year", "midi_filename", "audio_filename",
          "duration")
# Audio may have been re-encoded (e.g. WAV -> FLAC) after the index was written.
_AUDIO_EXTENSIONS = (".wav", ".flac")
_MIDI_EXTENSIONS = (".midi", ".mid")
_MAKE_CORPUS = "python -m hiermt.data.synth --output_dir=DIR"


@dataclasses.dataclass(frozen=True)
class Piece:
  """One row of the MAESTRO index, with absolute paths resolved against the data folder."""

  canonical_composer: str
  canonical_title: str
  split: str
  year: int
  midi_filename: str  # relative to the data folder, as in the index
  audio_filename: str
  duration: float  # seconds, as in the index
  midi_path: str  # absolute
  audio_path: str

  @property
  def piece_id(self):
    """A stable, unique id: the MIDI file name relative to the data folder, without extension."""
    return os.path.splitext(self.midi_filename)[0].replace("\\", "/")


def index_path(data_dir):
  """The index file of `data_dir` (the CSV preferred over the JSON).

  Raises:
    FileNotFoundError: neither index file exists; the message says how to build a corpus.
  """
  for name in (CSV_NAME, JSON_NAME):
    path = os.path.join(os.path.expanduser(data_dir), name)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(
      f"{data_dir} is not a MAESTRO v3 folder: looked for {CSV_NAME} and {JSON_NAME}. Point data_dir at an "
      f"unpacked MAESTRO v3.0.0 download, or generate a corpus with `{_MAKE_CORPUS}`.")


def _read_rows(path):
  """Index rows as dicts of strings (CSV) or JSON values, in index order."""
  if path.endswith(".csv"):
    with open(path, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      missing = [k for k in FIELDS if k not in (reader.fieldnames or ())]
      if missing:
        raise ValueError(f"{path}: missing columns {missing}; a MAESTRO v3 index has {list(FIELDS)}")
      return list(reader)
  with open(path, encoding="utf-8") as f:
    columns = json.load(f)
  missing = [k for k in FIELDS if k not in columns]
  if missing:
    raise ValueError(f"{path}: missing columns {missing}; a MAESTRO v3 index has {list(FIELDS)}")
  # Column-oriented: {column: {row_index: value}}, row indices as strings.
  keys = sorted(columns[FIELDS[0]], key=int)
  return [{k: columns[k][i] for k in FIELDS} for i in keys]


def _resolve(data_dir, relative, extensions, what, index):
  """Absolute path of `relative`, also trying the other `extensions` of the same stem."""
  path = os.path.join(data_dir, relative)
  if os.path.exists(path):
    return path
  stem = os.path.splitext(path)[0]
  for ext in extensions:
    if os.path.exists(stem + ext):
      return stem + ext
  raise FileNotFoundError(f"{what} file {path} listed in {index} does not exist (also tried {', '.join(extensions)})")


def load_index(data_dir, check_files=True):
  """Reads the MAESTRO index of `data_dir`.

  Args:
    data_dir: a MAESTRO-layout folder.
    check_files: resolve every MIDI and audio file on disk, failing on a missing one.
  Returns:
    list[Piece] in index order.
  Raises:
    FileNotFoundError: no index, or (with check_files) a listed file is missing.
    ValueError: the index lacks columns or names an unknown split.
  """
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  path = index_path(data_dir)
  result = []
  for row in _read_rows(path):
    if row["split"] not in SPLITS:
      raise ValueError(f"{path}: piece {row['midi_filename']} has split {row['split']!r}; valid: {', '.join(SPLITS)}")
    if check_files:
      midi_path = _resolve(data_dir, row["midi_filename"], _MIDI_EXTENSIONS, "MIDI", path)
      audio_path = _resolve(data_dir, row["audio_filename"], _AUDIO_EXTENSIONS, "audio", path)
    else:
      midi_path = os.path.join(data_dir, row["midi_filename"])
      audio_path = os.path.join(data_dir, row["audio_filename"])
    result.append(Piece(
        canonical_composer=str(row["canonical_composer"]), canonical_title=str(row["canonical_title"]),
        split=row["split"], year=int(row["year"]), midi_filename=row["midi_filename"],
        audio_filename=row["audio_filename"], duration=float(row["duration"]), midi_path=midi_path,
        audio_path=audio_path))
  return result


def pieces(data_dir, split, check_files=True):
  """The pieces of one split ('train', 'validation' or 'test') of `data_dir`, in index order."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
  return [p for p in load_index(data_dir, check_files) if p.split == split]


def write_index(data_dir, rows):
  """Writes the CSV and JSON index of `data_dir` (JSON first, CSV last, each atomically).

  Args:
    data_dir: the MAESTRO-layout folder.
    rows: dicts with the keys of FIELDS, in index order.
  """
  for row in rows:
    if row["split"] not in SPLITS:
      raise ValueError(f"split {row['split']!r} of {row['midi_filename']}; valid: {', '.join(SPLITS)}")
  columns = {k: {str(i): row[k] for i, row in enumerate(rows)} for k in FIELDS}
  with atomic_file.atomic_output(os.path.join(data_dir, JSON_NAME)) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(columns, f, indent=1)
  # The CSV comes last: its presence marks a complete folder.
  with atomic_file.atomic_output(os.path.join(data_dir, CSV_NAME)) as tmp:
    with open(tmp, "w", newline="", encoding="utf-8") as f:
      writer = csv.DictWriter(f, fieldnames=FIELDS)
      writer.writeheader()
      writer.writerows({k: row[k] for k in FIELDS} for row in rows)
