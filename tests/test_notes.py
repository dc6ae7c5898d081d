"""Tests for hiermt.notes: Notes validation, MIDI reading with sustain, writing, the 10 ms grid."""

import logging
import os

import note_seq
import numpy as np
import pretty_midi
import pytest

from hiermt import notes
from hiermt.data import sources


def _note_seq_notes(path):
  """Reference: note_seq's sustain-extended notes as sorted arrays (onset, pitch, offset, velocity)."""
  ns = note_seq.apply_sustain_control_changes(note_seq.midi_file_to_note_sequence(str(path)))
  rows = np.array([(n.start_time, n.pitch, n.end_time, n.velocity) for n in ns.notes if not n.is_drum],
                  np.float64).reshape(-1, 4)
  return rows[np.lexsort((rows[:, 3], rows[:, 2], rows[:, 1], rows[:, 0]))]


def _assert_matches_note_seq(path):
  got = notes.read_midi(path)
  ref = _note_seq_notes(path)
  assert len(got) == len(ref)
  np.testing.assert_allclose(got.onset, ref[:, 0], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(got.pitch, ref[:, 1])
  np.testing.assert_allclose(got.offset, ref[:, 2], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(got.velocity, ref[:, 3])
  return got


def _write(path, instruments):
  """Writes a MIDI file; instruments: [(is_drum, [(start, end, pitch, velocity)], [(time, cc64 value)])]."""
  midi = pretty_midi.PrettyMIDI(resolution=1000, initial_tempo=120.0)
  for is_drum, note_rows, pedal in instruments:
    inst = pretty_midi.Instrument(program=0, is_drum=is_drum)
    inst.notes = [pretty_midi.Note(v, p, s, e) for s, e, p, v in note_rows]
    inst.control_changes = [pretty_midi.ControlChange(64, value, t) for t, value in pedal]
    midi.instruments.append(inst)
  midi.write(str(path))
  return path


@pytest.mark.parametrize("path", sources.allowed_maestro_midis("~/.cache/hiermt"), ids=lambda p: p.name)
def test_read_midi_matches_note_seq_on_maestro(path):
  assert len(_assert_matches_note_seq(path)) > 1000


def test_sustain_cases_match_note_seq_and_hand_values(tmp_path):
  piano = [
      (0.0, 0.5, 60, 80),   # released under the pedal: held to pedal up at 2.0
      (0.2, 3.0, 62, 70),   # key still down at pedal up: unchanged
      (1.0, 1.2, 64, 60),   # released under the pedal, then re-struck at 1.5: ends at 1.5
      (1.5, 1.7, 64, 61),   # re-strike; released under the pedal: held to 2.0
      (2.5, 2.6, 65, 50),   # no pedal: unchanged
      (4.0, 4.1, 67, 90),   # same pitch, same onset, under the pedal: cut to nothing, deleted
      (4.0, 4.2, 67, 91),   # held to pedal up at 5.5
      (5.0, 5.5, 69, 40),   # released exactly when the pedal goes up at 5.5: unchanged
      (5.2, 6.0, 71, 40),   # the last event at 6.0
      (5.7, 5.8, 72, 41),   # under a pedal that never comes up: ends at the last event
  ]
  pedal = [(0.1, 100), (0.3, 70), (2.0, 10), (3.9, 127), (5.5, 0), (5.6, 127)]
  other = [(0.0, 0.5, 48, 30)]  # another instrument: the piano's pedal must not extend it
  drums = [(0.0, 0.1, 36, 100)]
  path = _write(tmp_path / "sustain.mid", [(False, piano, pedal), (False, other, []), (True, drums, [])])
  got = _assert_matches_note_seq(path)
  rows = sorted(zip(got.onset.round(6), got.pitch, got.offset.round(6), got.velocity))
  assert rows == [
      (0.0, 48, 0.5, 30), (0.0, 60, 2.0, 80), (0.2, 62, 3.0, 70), (1.0, 64, 1.5, 60),
      (1.5, 64, 2.0, 61), (2.5, 65, 2.6, 50), (4.0, 67, 5.5, 91), (5.0, 69, 5.5, 40),
      (5.2, 71, 6.0, 40), (5.7, 72, 6.0, 41)]


def test_notes_validation_names_the_offending_note():
  with pytest.raises(ValueError, match=r"note 1: pitch 128"):
    notes.Notes.create([0.0, 1.0], [1.0, 2.0], [60, 128], [10, 10])
  with pytest.raises(ValueError, match=r"note 0: velocity -1"):
    notes.Notes.create([0.0], [1.0], [60], [-1])
  with pytest.raises(ValueError, match=r"note 1: offset 1.0 must be greater than the onset"):
    notes.Notes.create([0.0, 1.0], [1.0, 1.0], [60, 61], [10, 10])
  with pytest.raises(ValueError, match=r"note 1 is out of order.*Notes.create"):
    notes.Notes(np.array([1.0, 0.0]), np.array([2.0, 1.0]), np.array([60, 60]), np.array([1, 1]))
  with pytest.raises(ValueError, match=r"one length"):
    notes.Notes.create([0.0], [1.0, 2.0], [60], [1])


def test_notes_create_sorts_and_freezes():
  n = notes.Notes.create([1.0, 0.5, 0.5], [2.0, 1.0, 0.9], [60, 64, 62], [1, 2, 3])
  np.testing.assert_array_equal(n.onset, [0.5, 0.5, 1.0])
  np.testing.assert_array_equal(n.pitch, [62, 64, 60])
  np.testing.assert_array_equal(n.velocity, [3, 2, 1])
  assert n.pitch.dtype == np.int32 and n.onset.dtype == np.float64 and len(n) == 3
  with pytest.raises(ValueError):
    n.onset[0] = 5.0
  assert len(notes.Notes.empty()) == 0


def test_one_note_per_key_cuts_at_the_next_onset_and_joins_one_strokes_notes():
  n = notes.Notes.create(
      onset=[0.0, 0.5, 2.0, 2.0, 3.0, 0.5, 1.0, 1.04, 1.1],
      offset=[4.0, 2.5, 5.0, 2.2, 3.1, 0.6, 1.01, 1.5, 1.2],
      pitch=[60, 60, 60, 60, 60, 64, 64, 64, 64],
      velocity=[1, 3, 5, 6, 7, 2, 4, 8, 9])
  one = notes.one_note_per_key(n)
  # Key 60: 0.0 ends at 0.5 (was 4.0), 0.5 at 2.0 (was 2.5); the two at 2.0 are one stroke: the first
  # in Notes order (offset 2.2, velocity 6) is kept, lasts as the longer (5.0) and is cut at 3.0.
  # Key 64: 1.0 and 1.04 (40 ms apart) are one stroke, velocity 4, ending as the longer (1.5) but cut
  # at 1.1, 60 ms after 1.04: a stroke of its own.
  rows = sorted(zip(one.onset.tolist(), one.offset.tolist(), one.pitch.tolist(), one.velocity.tolist()))
  assert rows == [(0.0, 0.5, 60, 1), (0.5, 0.6, 64, 2), (0.5, 2.0, 60, 3), (1.0, 1.1, 64, 4),
                  (1.1, 1.2, 64, 9), (2.0, 3.0, 60, 6), (3.0, 3.1, 60, 7)]
  assert len(notes.one_note_per_key(notes.Notes.empty())) == 0


def test_to_steps_rounds_and_keeps_one_step():
  n = notes.Notes.create([0.001, 0.014, 0.5], [0.004, 0.026, 0.75], [60, 61, 62], [1, 1, 1])
  onset, offset = notes.to_steps(n)
  np.testing.assert_array_equal(onset, [0, 1, 50])
  np.testing.assert_array_equal(offset, [1, 3, 75])  # the first note would otherwise be empty
  q = notes.quantize(n)
  np.testing.assert_array_equal(q.onset, [0.0, 0.01, 0.5])
  np.testing.assert_array_equal(q.offset, [0.01, 0.03, 0.75])


def test_zero_length_notes_are_dropped_and_counted(caplog):
  midi = pretty_midi.PrettyMIDI()
  inst = pretty_midi.Instrument(program=0)
  inst.notes = [pretty_midi.Note(50, p, 1.0, 2.0) for p in (60, 62, 64)]
  inst.notes[0].end = 1.0
  inst.notes[1].end = 0.5
  midi.instruments.append(inst)
  with caplog.at_level(logging.WARNING):
    got = notes.from_pretty_midi(midi, "made-up")
  np.testing.assert_array_equal(got.pitch, [64])
  assert "made-up: dropped 2 notes of zero or negative length" in caplog.text


def test_read_midi_errors_and_empty_file(tmp_path):
  bad = tmp_path / "broken.mid"
  bad.write_bytes(b"MThd\x00\x00\x00\x06garbage")
  with pytest.raises(notes.MidiError, match="broken.mid"):
    notes.read_midi(bad)
  with pytest.raises(FileNotFoundError):
    notes.read_midi(tmp_path / "missing.mid")
  empty = _write(tmp_path / "empty.mid", [(False, [], [(1.0, 100)])])
  assert len(notes.read_midi(empty)) == 0


def test_write_midi_round_trip(tmp_path):
  q = notes.quantize(notes.Notes.create([0.0, 0.013, 7.5, 100.0], [0.5, 3.0, 7.51, 250.25],
                                        [21, 108, 60, 60], [1, 127, 64, 90]))
  path = tmp_path / "out.mid"
  notes.write_midi(q, path)
  back = notes.read_midi(path)
  for field in ("onset", "offset"):
    np.testing.assert_allclose(getattr(back, field), getattr(q, field), rtol=0, atol=1e-9)
  for field in ("pitch", "velocity"):
    np.testing.assert_array_equal(getattr(back, field), getattr(q, field))
  assert pretty_midi.PrettyMIDI(str(path)).instruments[0].program == 0
  assert os.listdir(tmp_path) == ["out.mid"]


def test_write_midi_leaves_nothing_behind_on_failure(tmp_path, monkeypatch):
  def failing_write(self, filename):
    with open(filename, "wb") as f:
      f.write(b"MThd")  # half a file
    raise OSError("disk full")

  monkeypatch.setattr(pretty_midi.PrettyMIDI, "write", failing_write)
  with pytest.raises(OSError, match="disk full"):
    notes.write_midi(notes.Notes.create([0.0], [1.0], [60], [64]), tmp_path / "out.mid")
  assert os.listdir(tmp_path) == []
