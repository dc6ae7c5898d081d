"""The prepared store: resampled int16 audio, sustain-extended notes, idempotency, corrupt files."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pretty_midi
import pytest
import soundfile

from hiermt import audio
from hiermt import notes
from hiermt.data import maestro
from hiermt.data import prepare


def _midi(path, pitches, pedal=True):
  midi = pretty_midi.PrettyMIDI()
  piano = pretty_midi.Instrument(program=0)
  piano.notes = [pretty_midi.Note(velocity=60 + i, pitch=p, start=0.2 * i, end=0.2 * i + 0.1)
                 for i, p in enumerate(pitches)]
  if pedal:  # extends the notes released under it
    piano.control_changes = [pretty_midi.ControlChange(64, 100, 0.05), pretty_midi.ControlChange(64, 0, 0.9)]
  midi.instruments.append(piano)
  midi.write(path)


def _tone(seconds, rate, freq):
  t = np.arange(int(seconds * rate)) / rate
  return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture
def data_dir(tmp_path):
  """A MAESTRO-layout folder: stereo 44.1 kHz WAV, mono 22.05 kHz FLAC, a corrupt WAV, a corrupt MIDI."""
  root = tmp_path / "maestro"
  (root / "2004").mkdir(parents=True)
  (root / "2006").mkdir()
  left, right = _tone(2.0, 44100, 440.0), _tone(2.0, 44100, 660.0)
  soundfile.write(root / "2004/stereo.wav", np.stack([left, right], 1), 44100, subtype="PCM_16")
  soundfile.write(root / "2006/mono.flac", _tone(1.5, 22050, 330.0), 22050)
  (root / "2006/corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all")
  soundfile.write(root / "2006/badmidi.wav", _tone(1.0, 16000, 220.0), 16000)
  _midi(str(root / "2004/stereo.midi"), [60, 64, 67])
  _midi(str(root / "2006/mono.midi"), [48, 72], pedal=False)
  _midi(str(root / "2006/corrupt.midi"), [50])
  (root / "2006/badmidi.midi").write_bytes(b"MThd\x00\x00\x00\x06garbage")
  rows = [
      ("stereo", "2004", "train", ".wav", 2.0), ("mono", "2006", "validation", ".flac", 1.5),
      ("corrupt", "2006", "test", ".wav", 1.0), ("badmidi", "2006", "train", ".wav", 1.0)]
  maestro.write_index(str(root), [
      {"canonical_composer": "c", "canonical_title": name, "split": split, "year": int(year),
       "midi_filename": f"{year}/{name}.midi", "audio_filename": f"{year}/{name}{ext}", "duration": dur}
      for name, year, split, ext, dur in rows])
  return str(root)


def _files(folder):
  return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)


def test_store_contents(data_dir):
  summary = prepare.prepare(data_dir, workers=2, progress=False)
  out = os.path.join(data_dir, "hiermt_prepared")
  assert summary.prepared_dir == out
  assert (summary.prepared, summary.kept) == (2, 0)
  assert sorted(i for i, _ in summary.failed) == ["2006/badmidi", "2006/corrupt"]
  assert not [f for f in _files(out) if ".tmp" in f]

  train = prepare.Store(out, "train")
  assert train.piece_ids == ["2004/stereo"] and len(train) == 1
  wave = train.audio(0)
  assert isinstance(wave, np.memmap) and wave.dtype == np.int16 and wave.shape == (32000,)
  assert train.num_samples(0) == 32000 and train.duration(0) == pytest.approx(2.0)
  expected = audio.load_audio(os.path.join(data_dir, "2004/stereo.wav"))  # channel mean, resampled
  np.testing.assert_allclose(wave / 32767.0, expected, atol=2e-4)
  got, want = train.notes(0), notes.read_midi(os.path.join(data_dir, "2004/stereo.midi"))
  for field in ("onset", "offset", "pitch", "velocity"):
    np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
  assert got.offset.max() == pytest.approx(0.9, abs=1e-3)  # sustain-extended

  val = prepare.Store(out, "validation")
  assert val.piece_ids == ["2006/mono"] and val.num_samples(0) == 24000
  assert len(prepare.Store(out, "test")) == 0

  with open(os.path.join(out, prepare.INDEX_NAME)) as f:
    index = json.load(f)
  assert {e["id"] for e in index["failed"]} == {"2006/badmidi", "2006/corrupt"}
  assert "2006/corrupt.wav" in [e for e in index["failed"] if e["id"] == "2006/corrupt"][0]["error"]


def test_rerun_is_idempotent_and_notices_changes(data_dir):
  prepare.prepare(data_dir, workers=0, progress=False)
  out = prepare.default_prepared_dir(data_dir)
  stamps = {f: os.stat(f).st_mtime_ns for f in _files(out) if not f.endswith(prepare.INDEX_NAME)}
  again = prepare.prepare(data_dir, workers=0, progress=False)
  assert (again.prepared, again.kept, len(again.failed)) == (0, 2, 2)
  assert {f: os.stat(f).st_mtime_ns for f in stamps} == stamps

  soundfile.write(os.path.join(data_dir, "2006/mono.flac"), _tone(1.0, 22050, 330.0), 22050)
  changed = prepare.prepare(data_dir, workers=0, progress=False)
  assert (changed.prepared, changed.kept) == (1, 1)
  assert prepare.Store(out, "validation").num_samples(0) == 16000


def test_ensure_prepared_prepares_once(data_dir, tmp_path, monkeypatch):
  target = str(tmp_path / "elsewhere")
  assert prepare.ensure_prepared(data_dir, target, workers=0) == target
  assert prepare.Store(target, "train").piece_ids == ["2004/stereo"]

  def must_not_run(*args, **kwargs):
    raise AssertionError("prepare ran although nothing changed")

  monkeypatch.setattr(prepare, "prepare", must_not_run)
  assert prepare.ensure_prepared(data_dir, target, workers=0) == target
  # A rewritten MAESTRO index triggers an update.
  rows = [{k: getattr(p, k) for k in maestro.FIELDS} for p in maestro.load_index(data_dir)]
  maestro.write_index(data_dir, rows[:1])
  with pytest.raises(AssertionError, match="nothing changed"):
    prepare.ensure_prepared(data_dir, target, workers=0)


def test_store_pickles_without_memory_maps(data_dir):
  prepare.prepare(data_dir, workers=0, progress=False)
  store = prepare.Store(prepare.default_prepared_dir(data_dir), "train")
  first = np.array(store.audio(0))
  clone = pickle.loads(pickle.dumps(store))
  assert not clone._audio  # pylint: disable=protected-access
  np.testing.assert_array_equal(clone.audio(0), first)
  assert clone.split == "train" and clone.piece_ids == store.piece_ids


def test_store_errors(data_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="python -m hiermt.data.prepare"):
    prepare.Store(str(tmp_path / "nothing"), "train")
  prepare.prepare(data_dir, workers=0, progress=False)
  with pytest.raises(ValueError, match="train, validation, test"):
    prepare.Store(prepare.default_prepared_dir(data_dir), "eval")


def test_command_lines_end_to_end(tmp_path):
  """The contract commands: synth builds a corpus, prepare stores it at the default location."""
  corpus = str(tmp_path / "corpus")
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  run = lambda *args: subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env)
  made = run("hiermt.data.synth", f"--output_dir={corpus}", "--minutes=0.1", "--seed=3")
  assert made.returncode == 0, made.stderr[-2000:]
  index = maestro.load_index(corpus)
  assert len(index) >= 3 and f"{len(index)} pieces" in made.stdout
  done = run("hiermt.data.prepare", f"--data_dir={corpus}", "--workers=1")
  assert done.returncode == 0, done.stderr[-2000:]
  assert f"{len(index)} pieces prepared" in done.stdout
  stores = [prepare.Store(os.path.join(corpus, "hiermt_prepared"), s) for s in maestro.SPLITS]
  assert sorted(i for s in stores for i in s.piece_ids) == sorted(p.piece_id for p in index)
  assert run("hiermt.data.synth", "--minutes=1").returncode != 0  # --output_dir is required
