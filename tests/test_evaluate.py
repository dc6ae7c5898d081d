"""Tests for hiermt.evaluate: the CLI on a tiny MAESTRO-layout folder, the report files, clean errors."""

import csv
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest
import soundfile

from hiermt import evaluate
from hiermt import notes
from hiermt.data import maestro

_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Piece a: 4 notes. Piece b: 5 notes of 0.5 s (50 frames) on 5 pitches, so dropping one
# removes 1 of 5 notes and 50 of 250 frames.
NOTES_A = [(0.0, 0.5, 60, 80), (0.5, 1.0, 62, 60), (1.0, 2.0, 64, 100), (1.5, 2.5, 67, 40)]
NOTES_B = [(0.0, 0.5, 48, 30), (0.5, 1.0, 50, 50), (1.0, 1.5, 52, 70), (1.5, 2.0, 53, 90), (2.0, 2.5, 55, 110)]
ROWS = [
    {"canonical_composer": "A", "canonical_title": "Piece a", "split": "test", "year": 2004,
     "midi_filename": "2004/a.midi", "audio_filename": "2004/a.wav", "duration": 3.0},
    {"canonical_composer": "B", "canonical_title": "Piece b", "split": "test", "year": 2006,
     "midi_filename": "2006/b.midi", "audio_filename": "2006/b.wav", "duration": 3.0},
    {"canonical_composer": "C", "canonical_title": "Piece c", "split": "train", "year": 2006,
     "midi_filename": "2006/c.midi", "audio_filename": "2006/c.wav", "duration": 3.0},
]
F1_B = 2 * 1.0 * 0.8 / 1.8  # P = 1, R = 4/5


def _notes(rows):
  rows = np.array(rows, np.float64)
  return notes.Notes.create(rows[:, 0], rows[:, 1], rows[:, 2].astype(int), rows[:, 3].astype(int))


@pytest.fixture
def corpus(tmp_path):
  """(data_dir, predictions_dir): 2 test pieces + 1 train piece; predictions: a perfect, b missing a note."""
  data_dir, predictions = tmp_path / "maestro", tmp_path / "system"
  for row, piece in zip(ROWS, (NOTES_A, NOTES_B, NOTES_A)):
    notes.write_midi(_notes(piece), data_dir / row["midi_filename"])
    soundfile.write(data_dir / row["audio_filename"], np.zeros(16000, np.float32), 16000)
  maestro.write_index(str(data_dir), ROWS)
  notes.write_midi(_notes(NOTES_A), predictions / "a.mid")
  notes.write_midi(_notes(NOTES_B[:2] + NOTES_B[3:]), predictions / "b.midi")  # .midi is accepted too
  return data_dir, predictions


def _run(*args):
  return subprocess.run([sys.executable, "-m", "hiermt.evaluate", *args], cwd=_ROOT, capture_output=True,
                        text=True, timeout=300, check=False)


def test_predictions_report(corpus):
  data_dir, predictions = corpus
  proc = _run(f"--data_dir={data_dir}", f"--predictions={predictions}")
  assert proc.returncode == 0, proc.stderr
  out = predictions / "eval" / "test"

  lines = proc.stdout.splitlines()
  assert lines[0].split() == ["system", "pieces", "On", "P", "On", "R", "On", "F1", "On-Off", "F1",
                              "On-Off-Vel", "F1", "Frame", "F1"]
  # Means over the 2 pieces: P 1, R (1 + 0.8) / 2, F1 (1 + 8/9) / 2 = 0.944 for every F1.
  assert lines[2].split() == ["predictions", "2", "1.000", "0.900", "0.944", "0.944", "0.944", "0.944"]
  assert "WARNING" not in proc.stdout

  report = json.loads((out / "metrics.json").read_text())
  assert report["split"] == "test" and report["protocol"]["onset_tolerance_s"] == 0.05
  system = report["layouts"]["predictions"]
  assert system["pieces"] == 2 and system["missing_predictions"] == []
  assert system["protocol"]["pitch_unit"].startswith("Hz")
  mean = system["mean"]
  for metric in ("onset", "onset_offset", "onset_offset_velocity", "frame"):
    assert mean[f"{metric}_precision"] == pytest.approx(1.0)
    assert mean[f"{metric}_recall"] == pytest.approx(0.9)
    assert mean[f"{metric}_f1"] == pytest.approx((1.0 + F1_B) / 2)
  a, b = system["per_piece"]
  assert (a["piece_id"], b["piece_id"]) == ("2004/a", "2006/b")
  assert a["onset_offset_velocity_f1"] == 1.0 and a["frame_f1"] == 1.0
  assert (b["reference_notes"], b["estimated_notes"]) == (5, 4)
  assert b["onset_recall"] == pytest.approx(0.8) and b["frame_recall"] == pytest.approx(200 / 250)

  with open(out / "per_piece_predictions.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["piece_id"] for r in rows] == ["2004/a", "2006/b"]
  assert float(rows[1]["onset_f1"]) == pytest.approx(F1_B) and rows[1]["prediction_missing"] == "False"

  for stem in ("a", "b"):
    png = out / "plots" / "predictions" / f"{stem}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert not list(out.rglob(".*tmp*"))  # atomic writes leave no temporary files


def test_missing_prediction_scores_empty_and_is_listed(corpus, tmp_path):
  data_dir, predictions = corpus
  os.remove(predictions / "b.midi")
  out = tmp_path / "report"
  proc = _run(f"--data_dir={data_dir}", f"--predictions={predictions}", f"--output_dir={out}",
              "--plot_seconds=0")
  assert proc.returncode == 0, proc.stderr
  assert "MISSING PREDICTION" in proc.stderr
  assert "WARNING: 1 of 2 prediction files missing" in proc.stdout and "b.mid" in proc.stdout
  system = json.loads((out / "metrics.json").read_text())["layouts"]["predictions"]
  assert system["missing_predictions"] == [{"piece_id": "2006/b", "expected": str(predictions / "b.mid")}]
  assert system["mean"]["onset_f1"] == pytest.approx(0.5)  # piece a perfect, piece b empty
  assert system["per_piece"][1]["prediction_missing"] is True
  assert not (out / "plots").exists()


def test_bad_data_dir_is_one_clean_line(tmp_path):
  proc = _run(f"--data_dir={tmp_path}", f"--predictions={tmp_path}")
  assert proc.returncode == 2
  assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
  assert maestro.CSV_NAME in proc.stderr and "python -m hiermt.data.synth" in proc.stderr


def test_load_pieces_errors_and_max_pieces(corpus):
  data_dir, _ = corpus
  with pytest.raises(evaluate.EvaluationError, match="split 'validation'.*no pieces"):
    evaluate.load_pieces(str(data_dir), "validation")
  assert [p.piece_id for p in evaluate.load_pieces(str(data_dir), "test", max_pieces=1)] == ["2004/a"]


class _FakeTranscriber:
  """Transcribes every piece as piece a's notes."""

  def transcribe(self, audio):
    assert str(audio).endswith(".wav")
    return _notes(NOTES_A)


def _fake_transcribe_module(available):
  loaded = []  # (layout, checkpoint choice) of every load

  def load(workdir, layout="hierarchy", which="best", dtype=None, min_pitch_prob=None):
    if layout not in available:
      raise FileNotFoundError(f"{workdir}/{layout}: stage not trained; run python -m hiermt.main "
                              f"--config=configs/base.py:{layout} --workdir={workdir}")
    extras = tuple(x for x in (dtype, min_pitch_prob) if x is not None)
    loaded.append((layout, which) + extras)
    return _FakeTranscriber()
  return types.SimpleNamespace(available_layouts=lambda workdir: list(available), load=load, loaded=loaded)


def _use_fake_transcribe(monkeypatch, available):
  import hiermt  # pylint: disable=import-outside-toplevel
  fake = _fake_transcribe_module(available)
  monkeypatch.setitem(sys.modules, "hiermt.transcribe", fake)
  monkeypatch.setattr(hiermt, "transcribe", fake, raising=False)
  return fake


def test_model_layouts_report(monkeypatch, capsys, corpus, tmp_path):
  fake = _use_fake_transcribe(monkeypatch, ["hierarchy", "roll"])
  data_dir, _ = corpus
  workdir = tmp_path / "run"
  workdir.mkdir()
  results = evaluate.run(evaluate.Options(data_dir=str(data_dir), workdir=str(workdir), plot_seconds=2.0))

  assert list(results) == ["roll", "hierarchy"]  # Table I order, only the trained layouts
  assert fake.loaded == [("roll", "best"), ("hierarchy", "best")]  # each stage's best checkpoint by default
  table = capsys.readouterr().out.splitlines()
  # Piece a is transcribed perfectly, piece b (transcribed as piece a) not at all: means 0.5.
  assert table[2].split() == ["Roll", "2"] + ["0.500"] * 6
  assert table[3].split()[0] == "Hierarchy"
  out = workdir / "eval" / "test"
  report = json.loads((out / "metrics.json").read_text())
  assert list(report["layouts"]) == ["roll", "hierarchy"] and report["workdir"] == str(workdir)
  assert report["layouts"]["roll"]["per_piece"][1]["onset_f1"] == 0.0
  for layout in ("roll", "hierarchy"):
    assert (out / f"per_piece_{layout}.csv").exists()
    assert sorted(p.name for p in (out / "plots" / layout).iterdir()) == ["a.png", "b.png"]
  assert (report["checkpoint"], report["dtype"]) == ("best", "as trained")
  evaluate.run(evaluate.Options(data_dir=str(data_dir), workdir=str(workdir), layout="roll", checkpoint="latest",
                                output_dir=str(tmp_path / "latest"), plot_seconds=0.0, dtype="bfloat16",
                                min_pitch_prob=0.7))
  assert fake.loaded[-1] == ("roll", "latest", "bfloat16", 0.7)
  assert json.loads((tmp_path / "latest" / "metrics.json").read_text())["dtype"] == "bfloat16"


def test_model_layout_errors(monkeypatch, corpus, tmp_path):
  data_dir, _ = corpus
  options = evaluate.Options(data_dir=str(data_dir), workdir=str(tmp_path), layout="flatten", plot_seconds=0)
  _use_fake_transcribe(monkeypatch, ["hierarchy"])
  with pytest.raises(evaluate.EvaluationError, match="flatten.*python -m hiermt.main.*:flatten"):
    evaluate.run(options)
  _use_fake_transcribe(monkeypatch, [])
  with pytest.raises(evaluate.EvaluationError, match="no trained layout.*python -m hiermt.main"):
    evaluate.run(dataclasses.replace(options, layout="all"))
  with pytest.raises(evaluate.EvaluationError, match="--workdir is required"):
    evaluate.run(dataclasses.replace(options, workdir=None))
  with pytest.raises(evaluate.EvaluationError, match="does not apply to --predictions"):
    evaluate.run(dataclasses.replace(options, predictions=str(tmp_path), layout_given=True))


def test_untrained_workdir_with_real_transcribe_is_one_clean_line(corpus, tmp_path):
  # Also checks that importing hiermt.transcribe, which defines --workdir and --layout as well,
  # after the flags are parsed does not fail.
  data_dir, _ = corpus
  proc = _run(f"--data_dir={data_dir}", f"--workdir={tmp_path}", "--layout=roll")
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr  # JAX may log on import, so only the last line is ours
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("hiermt.evaluate: error: layout roll") and "python -m hiermt.main" in last


def test_plot_piece_writes_png(tmp_path):
  ref = _notes(NOTES_B)
  est = _notes(NOTES_B[1:] + [(0.0, 0.5, 49, 30)])
  path = tmp_path / "x" / "roll.png"
  evaluate.plot_piece(path, ref, est, "title", seconds=2.0)
  assert path.read_bytes()[:4] == b"\x89PNG"
  evaluate.plot_piece(tmp_path / "empty.png", notes.Notes.empty(), notes.Notes.empty(), "empty", seconds=2.0)
  assert (tmp_path / "empty.png").exists()
