"""MAESTRO v3 index reading: CSV and JSON, splits, path resolution, errors."""

import csv
import dataclasses
import json
import os

import pytest

from hiermt.data import maestro

ROWS = [
    {"canonical_composer": "Alban Berg", "canonical_title": "Sonata Op. 1", "split": "train", "year": 2018,
     "midi_filename": "2018/a.midi", "audio_filename": "2018/a.wav", "duration": 698.66},
    {"canonical_composer": "J. S. Bach", "canonical_title": "Prelude, with comma", "split": "validation",
     "year": 2004, "midi_filename": "2004/b.midi", "audio_filename": "2004/b.wav", "duration": 12.5},
    {"canonical_composer": "F. Liszt", "canonical_title": "Etude", "split": "test", "year": 2004,
     "midi_filename": "2004/c.midi", "audio_filename": "2004/c.wav", "duration": 3.0},
    {"canonical_composer": "F. Liszt", "canonical_title": "Etude 2", "split": "train", "year": 2006,
     "midi_filename": "2006/d.midi", "audio_filename": "2006/d.wav", "duration": 4.25},
]


def _touch_files(root, rows=ROWS):
  for row in rows:
    for key in ("midi_filename", "audio_filename"):
      path = os.path.join(root, row[key])
      os.makedirs(os.path.dirname(path), exist_ok=True)
      open(path, "wb").close()


def _write_csv(root, rows=ROWS, fields=maestro.FIELDS):
  with open(os.path.join(root, maestro.CSV_NAME), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)


def _write_json(root, rows=ROWS):
  # The official file is column-oriented: {column: {"row index": value}}.
  columns = {k: {str(i): r[k] for i, r in enumerate(rows)} for k in maestro.FIELDS}
  with open(os.path.join(root, maestro.JSON_NAME), "w") as f:
    json.dump(columns, f)


def test_csv_index_fields_and_paths(tmp_path):
  _touch_files(tmp_path)
  _write_csv(tmp_path)
  index = maestro.load_index(str(tmp_path))
  assert [p.midi_filename for p in index] == [r["midi_filename"] for r in ROWS]
  first = index[0]
  assert first.canonical_composer == "Alban Berg" and first.year == 2018 and first.duration == 698.66
  assert first.midi_path == os.path.join(tmp_path, "2018/a.midi") and os.path.isabs(first.audio_path)
  assert first.piece_id == "2018/a"
  assert index[1].canonical_title == "Prelude, with comma"
  with pytest.raises(dataclasses.FrozenInstanceError):
    first.split = "test"


def test_json_index_matches_csv(tmp_path):
  _touch_files(tmp_path)
  _write_json(tmp_path)
  from_json = maestro.load_index(str(tmp_path))
  _write_csv(tmp_path)
  assert maestro.index_path(str(tmp_path)).endswith(".csv")
  assert maestro.load_index(str(tmp_path)) == from_json


def test_json_rows_follow_numeric_index_order(tmp_path):
  rows = ROWS * 3  # 12 rows: "10" must come after "9", not after "1"
  rows = [dict(r, midi_filename=f"x/{i}.midi", audio_filename=f"x/{i}.wav") for i, r in enumerate(rows)]
  _write_json(tmp_path, rows)
  index = maestro.load_index(str(tmp_path), check_files=False)
  assert [p.midi_filename for p in index] == [f"x/{i}.midi" for i in range(12)]


def test_pieces_by_split(tmp_path):
  _touch_files(tmp_path)
  _write_csv(tmp_path)
  assert [p.midi_filename for p in maestro.pieces(str(tmp_path), "train")] == ["2018/a.midi", "2006/d.midi"]
  assert [p.split for p in maestro.pieces(str(tmp_path), "test")] == ["test"]
  with pytest.raises(ValueError, match="train, validation, test"):
    maestro.pieces(str(tmp_path), "valid")


def test_missing_index_says_what_was_looked_for(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    maestro.load_index(str(tmp_path))
  message = str(err.value)
  assert maestro.CSV_NAME in message and maestro.JSON_NAME in message
  assert "python -m hiermt.data.synth --output_dir=" in message


def test_missing_file_is_named(tmp_path):
  _touch_files(tmp_path)
  _write_csv(tmp_path)
  os.remove(os.path.join(tmp_path, "2004/b.wav"))
  with pytest.raises(FileNotFoundError, match="2004/b.wav"):
    maestro.load_index(str(tmp_path))
  assert len(maestro.load_index(str(tmp_path), check_files=False)) == len(ROWS)


def test_reencoded_audio_is_found(tmp_path):
  _touch_files(tmp_path)
  _write_csv(tmp_path)
  os.rename(os.path.join(tmp_path, "2004/b.wav"), os.path.join(tmp_path, "2004/b.flac"))
  index = maestro.load_index(str(tmp_path))
  assert index[1].audio_path == os.path.join(tmp_path, "2004/b.flac")


def test_bad_index_contents(tmp_path):
  _touch_files(tmp_path)
  _write_csv(tmp_path, fields=[f for f in maestro.FIELDS if f != "split"])
  with pytest.raises(ValueError, match="missing columns.*split"):
    maestro.load_index(str(tmp_path))
  _write_csv(tmp_path, rows=[dict(ROWS[0], split="holdout")])
  with pytest.raises(ValueError, match="holdout"):
    maestro.load_index(str(tmp_path))


def test_write_index_round_trip(tmp_path):
  _touch_files(tmp_path)
  maestro.write_index(str(tmp_path), ROWS)
  from_csv = maestro.load_index(str(tmp_path))
  os.remove(os.path.join(tmp_path, maestro.CSV_NAME))
  assert maestro.load_index(str(tmp_path)) == from_csv
  assert [(p.year, p.duration, p.split) for p in from_csv] == [(r["year"], r["duration"], r["split"]) for r in ROWS]
  assert sorted(os.listdir(tmp_path)) == ["2004", "2006", "2018", maestro.JSON_NAME]
