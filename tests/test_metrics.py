"""Tests for hiermt.metrics: the scoring protocol, pinned by hand-computed cases and by mir_eval itself."""

import warnings

import mir_eval
import numpy as np
import pretty_midi
import pytest

from hiermt import metrics
from hiermt import notes


def _notes(rows):
  """Notes from (onset, offset, pitch, velocity) rows."""
  rows = np.array(rows, np.float64).reshape(-1, 4)
  return notes.Notes.create(rows[:, 0], rows[:, 1], rows[:, 2].astype(int), rows[:, 3].astype(int))


def _f1s(result):
  return [result[f"{name}_f1"] for name in metrics.METRICS]


def _mir_eval_scores(ref, est, to_hz=mir_eval.util.midi_to_hz):
  """mir_eval called directly on whole pieces: [P, R, F1] of onset, onset_offset, onset_offset_velocity."""
  ri, ei = np.stack([ref.onset, ref.offset], 1), np.stack([est.onset, est.offset], 1)
  rp, ep = to_hz(ref.pitch.astype(float)), to_hz(est.pitch.astype(float))
  onset = mir_eval.transcription.precision_recall_f1_overlap(ri, rp, ei, ep, offset_ratio=None)[:3]
  offset = mir_eval.transcription.precision_recall_f1_overlap(ri, rp, ei, ep, offset_ratio=0.2)[:3]
  velocity = mir_eval.transcription_velocity.precision_recall_f1_overlap(
      ri, rp, ref.velocity, ei, ep, est.velocity, offset_ratio=0.2, velocity_tolerance=0.1)[:3]
  return list(onset) + list(offset) + list(velocity)


PIECE = [(0.5, 1.5, 60, 80), (0.5, 1.0, 64, 70), (1.2, 2.0, 67, 60), (2.0, 2.5, 72, 90)]


def test_exact_match_scores_one():
  ref = _notes(PIECE)
  result = metrics.note_metrics(ref, _notes(PIECE))
  assert set(result) == set(metrics.METRIC_KEYS)
  assert all(v == 1.0 for v in result.values())


@pytest.mark.parametrize("shift, matches", [(0.04, True), (-0.04, True), (0.06, False), (-0.06, False)])
def test_onset_tolerance_is_50ms(shift, matches):
  ref = _notes([(1.0, 2.0, 60, 80)])
  est = _notes([(1.0 + shift, 2.0, 60, 80)])
  result = metrics.note_metrics(ref, est)
  expected = 1.0 if matches else 0.0
  assert result["onset_f1"] == expected
  assert result["onset_offset_f1"] == expected  # the offset itself is exact


@pytest.mark.parametrize("ref_offset, est_offset, matches", [
    (2.0, 2.19, True), (2.0, 1.81, True),    # 1 s note: tolerance 20 % = 0.2 s
    (2.0, 2.21, False), (2.0, 1.79, False),
    (1.1, 1.14, True), (1.1, 1.16, False),   # 0.1 s note: 20 % is 0.02 s, the 50 ms floor applies
])
def test_offset_tolerance_is_20_percent_or_50ms(ref_offset, est_offset, matches):
  ref = _notes([(1.0, ref_offset, 60, 80)])
  est = _notes([(1.0, est_offset, 60, 80)])
  result = metrics.note_metrics(ref, est)
  assert result["onset_f1"] == 1.0
  assert result["onset_offset_f1"] == (1.0 if matches else 0.0)
  assert result["onset_offset_velocity_f1"] == (1.0 if matches else 0.0)


def test_velocity_error_fails_only_the_velocity_metric():
  # Reference velocities 20, 100, 60 scale to 0, 1, 0.5. The estimate plays the last note at 100:
  # the least-squares line through (20, 0), (100, 1), (100, 0.5) maps 20 -> 0 and 100 -> 0.75, so
  # only the first note is within 0.1 (errors 0, 0.25, 0.25): 1 of 3 notes, P = R = F1 = 1/3.
  ref = _notes([(0.0, 1.0, 60, 20), (1.0, 2.0, 62, 100), (2.0, 3.0, 64, 60)])
  est = _notes([(0.0, 1.0, 60, 20), (1.0, 2.0, 62, 100), (2.0, 3.0, 64, 100)])
  result = metrics.note_metrics(ref, est)
  assert result["onset_f1"] == result["onset_offset_f1"] == result["frame_f1"] == 1.0
  for key in ("precision", "recall", "f1"):
    assert result[f"onset_offset_velocity_{key}"] == pytest.approx(1 / 3)
  # A constant offset or scale in velocity is not an error: mir_eval fits it away.
  louder = _notes([(0.0, 1.0, 60, 30), (1.0, 2.0, 62, 110), (2.0, 3.0, 64, 70)])
  assert metrics.note_metrics(ref, louder)["onset_offset_velocity_f1"] == 1.0


def test_pitches_are_compared_in_hz():
  # One semitone is 100 cents, outside the 50-cent tolerance. Passed as Hz, MIDI numbers >= 35
  # are within 50 cents of their neighbours (1200 * log2(61 / 60) = 28.6 cents), so a metric
  # fed MIDI numbers would score these as perfect.
  ref = _notes([(0.0, 1.0, 40, 80), (1.0, 2.0, 60, 80), (2.0, 3.0, 100, 80)])
  est = _notes([(0.0, 1.0, 41, 80), (1.0, 2.0, 61, 80), (2.0, 3.0, 99, 80)])
  assert _mir_eval_scores(ref, est, to_hz=lambda p: p)[2] == 1.0  # the bug this test guards against
  result = metrics.note_metrics(ref, est)
  assert all(v == 0.0 for v in result.values())
  assert _mir_eval_scores(ref, est) == [0.0] * 9


def test_reference_pedal_extension_decides_offsets(tmp_path):
  # The key is released at 0.5 s, but the pedal (down at 0.1 s, up at 2.0 s) holds the note to 2.0 s.
  midi = pretty_midi.PrettyMIDI(resolution=1000, initial_tempo=120.0)
  piano = pretty_midi.Instrument(program=0)
  piano.notes = [pretty_midi.Note(80, 60, 0.0, 0.5), pretty_midi.Note(70, 64, 2.5, 3.0)]
  piano.control_changes = [pretty_midi.ControlChange(64, 127, 0.1), pretty_midi.ControlChange(64, 0, 2.0)]
  midi.instruments.append(piano)
  path = tmp_path / "pedal.mid"
  midi.write(str(path))
  ref = notes.read_midi(path)
  np.testing.assert_allclose(ref.offset, [2.0, 3.0], atol=1e-6)

  as_played = _notes([(0.0, 2.0, 60, 80), (2.5, 3.0, 64, 70)])
  key_release = _notes([(0.0, 0.5, 60, 80), (2.5, 3.0, 64, 70)])
  assert metrics.note_metrics(ref, as_played)["onset_offset_f1"] == 1.0
  result = metrics.note_metrics(ref, key_release)
  assert result["onset_f1"] == 1.0
  # Offset 0.5 vs 2.0 is 1.5 s off, beyond max(0.2 * 2.0, 0.05) = 0.4 s: 1 of 2 notes matches.
  assert result["onset_offset_f1"] == pytest.approx(0.5)


def test_piano_roll_convention():
  n = _notes([(0.004, 0.016, 60, 80),   # steps 0..2: frames 0, 1
              (0.031, 0.032, 62, 80),   # rounds to one step: still one frame (3)
              (0.0, 0.05, 127, 80)])    # frames 0..4
  roll = metrics.piano_roll(n, num_frames=4)  # frame 4 is cut
  assert roll.shape == (4, 128) and roll.dtype == bool
  assert np.flatnonzero(roll[:, 60]).tolist() == [0, 1]
  assert np.flatnonzero(roll[:, 62]).tolist() == [3]
  assert np.flatnonzero(roll[:, 127]).tolist() == [0, 1, 2, 3]
  assert roll.sum() == 7


def test_frame_metrics_by_hand():
  # Reference: pitch 60 on frames 0..9, pitch 64 on frames 5..14 (20 frames).
  # Estimate: pitch 60 on frames 2..11, pitch 67 on frames 0..4 (15 frames).
  # True positives: pitch 60, frames 2..9 = 8. P = 8/15, R = 8/20, F1 = 16/35.
  ref = _notes([(0.0, 0.10, 60, 80), (0.05, 0.15, 64, 80)])
  est = _notes([(0.02, 0.12, 60, 80), (0.0, 0.05, 67, 80)])
  result = metrics.frame_metrics(ref, est)
  assert result["frame_precision"] == pytest.approx(8 / 15)
  assert result["frame_recall"] == pytest.approx(8 / 20)
  assert result["frame_f1"] == pytest.approx(16 / 35)
  assert metrics.note_metrics(ref, est)["frame_f1"] == pytest.approx(16 / 35)


@pytest.mark.parametrize("ref_empty, est_empty", [(True, False), (False, True), (True, True)])
def test_empty_sides_score_zero_without_warnings(ref_empty, est_empty):
  piece = _notes(PIECE)
  ref = notes.Notes.empty() if ref_empty else piece
  est = notes.Notes.empty() if est_empty else piece
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    result = metrics.note_metrics(ref, est)
  assert set(result) == set(metrics.METRIC_KEYS)
  assert all(v == 0.0 for v in result.values())
  if not (ref_empty and est_empty):  # mir_eval's convention (it warns on empty input)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      ri = np.zeros((0, 2)) if ref_empty else np.stack([ref.onset, ref.offset], 1)
      ei = np.zeros((0, 2)) if est_empty else np.stack([est.onset, est.offset], 1)
      rp = mir_eval.util.midi_to_hz(ref.pitch.astype(float))
      ep = mir_eval.util.midi_to_hz(est.pitch.astype(float))
      assert mir_eval.transcription.precision_recall_f1_overlap(ri, rp, ei, ep)[:3] == (0.0, 0.0, 0.0)


def _random_piece(rng, n, seconds):
  """Random notes on the 10 ms grid, so onset and offset distances often sit exactly on a tolerance."""
  onset = np.round(rng.uniform(0, seconds, n), 2)
  offset = onset + np.round(rng.uniform(0.01, 1.0, n), 2)
  return notes.Notes.create(onset, offset, rng.integers(55, 67, n), rng.integers(1, 128, n))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_mir_eval_on_random_pieces(seed):
  rng = np.random.default_rng(seed)
  ref = _random_piece(rng, 400, 30.0)
  # The estimate: 85 % of the notes, jittered around the tolerances, a few a semitone off, plus extras.
  keep = rng.random(len(ref)) < 0.85
  k = int(keep.sum())
  onset = np.maximum(ref.onset[keep] + rng.choice([0.0, 0.02, -0.04, 0.05, -0.05, 0.06], k), 0.0)
  offset = np.maximum(ref.offset[keep] + np.round(rng.normal(0, 0.15, k), 2), onset + 0.01)
  pitch = ref.pitch[keep] + rng.choice([0, 0, 0, 0, 0, 0, 1, -1], k)
  velocity = np.clip(ref.velocity[keep] + rng.integers(-15, 16, k), 0, 127)
  extra = _random_piece(rng, 80, 30.0)
  est = notes.Notes.create(np.r_[onset, extra.onset], np.r_[offset, extra.offset],
                           np.r_[pitch, extra.pitch], np.r_[velocity, extra.velocity])

  result = metrics.note_metrics(ref, est)
  ours = [result[f"{m}_{s}"] for m in metrics.NOTE_METRICS for s in ("precision", "recall", "f1")]
  assert ours == _mir_eval_scores(ref, est)  # exactly: same matching, same arithmetic
  assert 0.1 < result["onset_offset_velocity_f1"] < result["onset_offset_f1"] < result["onset_f1"] < 1.0

  ri, ei = np.stack([ref.onset, ref.offset], 1), np.stack([est.onset, est.offset], 1)
  rp, ep = mir_eval.util.midi_to_hz(ref.pitch.astype(float)), mir_eval.util.midi_to_hz(est.pitch.astype(float))
  for ratio in (None, 0.2):
    expected = mir_eval.transcription.match_notes(ri, rp, ei, ep, offset_ratio=ratio)
    assert metrics.match_notes(ref, est, offset_ratio=ratio).tolist() == [list(pair) for pair in expected]


def test_mean_metrics():
  first = {"onset_f1": 1.0, "frame_f1": 0.5}
  second = {"onset_f1": 0.5, "frame_f1": 0.0}
  assert metrics.mean_metrics([first, second]) == {"onset_f1": 0.75, "frame_f1": 0.25}
  # Unweighted: a short piece counts as much as a long one.
  short, long = _notes(PIECE[:1]), _notes(PIECE)
  per_piece = [metrics.note_metrics(short, short), metrics.note_metrics(long, _notes(PIECE[:2]))]
  assert metrics.mean_metrics(per_piece)["onset_recall"] == pytest.approx((1.0 + 0.5) / 2)
  with pytest.raises(ValueError, match="at least one"):
    metrics.mean_metrics([])
  with pytest.raises(ValueError, match="piece 1"):
    metrics.mean_metrics([first, {"onset_f1": 1.0}])
