"""Tests for hiermt.vocabulary: ids, per-stage layouts and masks, exact round trips, tolerant decoding."""

import time

import mir_eval
import numpy as np
import pytest

from hiermt import notes
from hiermt import vocabulary as V
from hiermt.data import sources

SOS, EOS, SUS = 1, 2, 4


def t(step):  # time token, written out independently of the module under test
  return 8 + step


def p(pitch):
  return 1009 + pitch


def v(velocity):
  return 1137 + velocity


@pytest.fixture(scope="module")
def maestro():
  return [notes.read_midi(path) for path in sources.allowed_maestro_midis("~/.cache/hiermt")]


def _assert_same(a, b, fields=("onset", "offset", "pitch", "velocity")):
  assert len(a) == len(b)
  for field in fields:
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def _hz(pitch):
  return 440.0 * 2.0 ** ((pitch - 69) / 12)


def _windowed_f1(ref, est, velocity, seconds=60.0):
  """mir_eval F1 per `seconds` window of onsets (its matching is quadratic in the note count)."""
  scores = []
  for lo in np.arange(0.0, max(ref.onset.max(), est.onset.max()) + seconds, seconds):
    r = (ref.onset >= lo) & (ref.onset < lo + seconds)
    e = (est.onset >= lo) & (est.onset < lo + seconds)
    if not r.any() and not e.any():
      continue
    args = (np.stack([ref.onset, ref.offset], 1)[r], _hz(ref.pitch[r]))
    est_args = (np.stack([est.onset, est.offset], 1)[e], _hz(est.pitch[e]))
    if velocity:
      _, _, f1, _ = mir_eval.transcription_velocity.precision_recall_f1_overlap(
          *args, ref.velocity[r], *est_args, est.velocity[e], onset_tolerance=0.05,
          offset_ratio=0.2, offset_min_tolerance=0.05)
    else:
      _, _, f1, _ = mir_eval.transcription.precision_recall_f1_overlap(
          *args, *est_args, onset_tolerance=0.05, offset_ratio=None)
    scores.append(f1)
  return min(scores)


def test_id_ranges():
  assert V.VOCAB_SIZE == 1265
  assert (V.PAD, V.SOS, V.EOS, V.UNK, V.NOTE_SUSTAIN) == (0, 1, 2, 3, 4)
  assert V.TASK_IDS == {"onset_pitch": 5, "velocity": 6, "offset": 7, "flatten": 5}
  assert int(V.time_id(0)) == 8 and int(V.time_id(1000)) == 1008
  assert int(V.pitch_id(0)) == 1009 and int(V.pitch_id(127)) == 1136
  assert int(V.velocity_id(0)) == 1137 and int(V.velocity_id(127)) == 1264
  ids = np.arange(1009, 1137)
  np.testing.assert_array_equal(V.id_to_pitch(ids), np.arange(128))
  np.testing.assert_array_equal(V.id_to_step(V.time_id(np.arange(1001))), np.arange(1001))
  np.testing.assert_array_equal(V.id_to_velocity(V.velocity_id(np.arange(128))), np.arange(128))


def test_slot_masks_are_the_layouts():
  flat = V.slot_masks("flatten")
  assert flat.shape == (4, 1265)
  assert set(np.flatnonzero(flat[0])) == {4} | set(range(8, 1009))
  assert set(np.flatnonzero(flat[1])) == set(range(1009, 1137))
  assert set(np.flatnonzero(flat[3])) == set(range(1137, 1265))
  onset_pitch = V.slot_masks("onset_pitch")
  assert onset_pitch.shape == (2, 1265) and not onset_pitch[0, 4]
  assert V.slot_masks("velocity")[2, 1137] and V.slot_masks("offset")[2, 4]


# Segment 10..20 s: two notes carried in (one past the end too), two starting together,
# one ending exactly on the segment end; one ending exactly on the start and one starting
# exactly on the end are not in it.
_SEGMENT_NOTES = notes.Notes.create(
    onset=[5.0, 3.0, 10.5, 10.5, 19.99, 20.0, 1.0],
    offset=[12.0, 25.0, 11.0, 30.0, 20.0, 21.0, 10.0],
    pitch=[60, 55, 64, 62, 70, 72, 40],
    velocity=[70, 50, 80, 90, 1, 5, 5])

_EXPECTED = {
    "onset_pitch": ([SOS, 5, t(50), p(62), t(50), p(64), t(999), p(70), EOS],
                    [0, 0, 1, 1, 1, 1, 1, 1, 1]),
    "velocity": ([SOS, 6, t(50), p(62), v(90), t(50), p(64), v(80), t(999), p(70), v(1), EOS],
                 [0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 1, 1]),
    "offset": ([SOS, 7, SUS, p(55), SUS, SUS, p(60), t(200), t(50), p(62), SUS, t(50), p(64), t(100),
                t(999), p(70), t(1000), EOS],
               [0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 1]),
    "flatten": ([SOS, 5, SUS, p(55), SUS, v(50), SUS, p(60), t(200), v(70), t(50), p(62), SUS, v(90),
                 t(50), p(64), t(100), v(80), t(999), p(70), t(1000), v(1), EOS],
                [0, 0] + [1] * 20 + [1]),
}


@pytest.mark.parametrize("stage", V.STAGES)
def test_encode_segment_layout_and_mask(stage):
  tokens, mask = V.encode_segment(_SEGMENT_NOTES, 10.0, stage)
  want_tokens, want_mask = _EXPECTED[stage]
  assert tokens.dtype == np.int32 and mask.dtype == bool
  assert tokens.tolist() == want_tokens
  assert mask.astype(int).tolist() == want_mask


def test_encode_segment_rejects_bad_arguments():
  with pytest.raises(ValueError, match="valid stages"):
    V.encode_segment(_SEGMENT_NOTES, 0.0, "encoder")
  with pytest.raises(ValueError, match="10 ms grid"):
    V.encode_segment(_SEGMENT_NOTES, 0.005, "flatten")


def test_encode_segment_at_arbitrary_grid_start():
  n = notes.Notes.create([1.234, 2.0], [1.5, 12.5], [60, 61], [10, 20])
  tokens, _ = V.encode_segment(n, 1.23, "flatten")
  assert tokens.tolist() == [SOS, 5, t(0), p(60), t(27), v(10), t(77), p(61), SUS, v(20), EOS]
  tokens, _ = V.encode_segment(n, 1.24, "offset")
  assert tokens.tolist() == [SOS, 7, SUS, p(60), t(26), t(76), p(61), SUS, EOS]


@pytest.mark.parametrize("stage", V.STAGES)
def test_maestro_round_trip_is_exact(maestro, stage):
  fields = {"onset_pitch": ("onset", "pitch"), "velocity": ("onset", "pitch", "velocity"),
            "offset": ("onset", "offset", "pitch"), "flatten": ("onset", "offset", "pitch", "velocity")}
  for n in maestro:
    segments = V.encode_piece(n, stage)
    assert len(segments) == int(np.ceil(notes.quantize(n).offset.max() / 10.0 - 1e-9))
    back = V.decode_piece(segments, stage)
    _assert_same(back, notes.quantize(n), fields[stage])
    if stage in ("onset_pitch", "flatten"):
      assert _windowed_f1(notes.quantize(n), back, velocity=stage == "flatten") == 1.0


def test_onset_pitch_placeholders():
  back = V.decode_piece(V.encode_piece(_SEGMENT_NOTES, "onset_pitch"), "onset_pitch")
  np.testing.assert_allclose(back.offset - back.onset, 0.1)
  assert set(back.velocity.tolist()) == {100}


_SYNTHETIC = {
    "several segments": ([2.0], [35.5], [60], [64]),
    "ends on a boundary": ([5.0, 12.0], [10.0, 20.0], [60, 61], [1, 2]),
    "starts on a boundary": ([10.0, 0.0], [12.0, 10.0], [60, 60], [3, 4]),
    "empty middle segments": ([1.0, 41.0], [2.0, 42.0], [60, 62], [5, 6]),
    "same pitch carried twice": ([1.0, 5.0, 8.0, 8.0], [25.0, 15.0, 31.0, 21.0], [60, 60, 60, 60],
                                 [10, 20, 30, 40]),
    "tiny notes": ([0.001, 9.996, 19.999], [0.002, 10.004, 20.004], [21, 108, 50], [0, 127, 9]),
}


@pytest.mark.parametrize("case", list(_SYNTHETIC))
@pytest.mark.parametrize("stage", ["flatten", "offset"])
def test_synthetic_round_trip_is_exact(case, stage):
  n = notes.Notes.create(*_SYNTHETIC[case])
  back = V.decode_piece(V.encode_piece(n, stage), stage)
  fields = ("onset", "offset", "pitch", "velocity") if stage == "flatten" else ("onset", "offset", "pitch")
  _assert_same(back, notes.quantize(n), fields)


def test_long_note_tokens_and_empty_segments():
  long_note = V.encode_piece(notes.Notes.create([2.0], [35.5], [60], [64]), "flatten")
  assert [s.tolist() for s in long_note] == [
      [SOS, 5, t(200), p(60), SUS, v(64), EOS],
      [SOS, 5, SUS, p(60), SUS, v(64), EOS],
      [SOS, 5, SUS, p(60), SUS, v(64), EOS],
      [SOS, 5, SUS, p(60), t(550), v(64), EOS]]
  gaps = V.encode_piece(notes.Notes.create(*_SYNTHETIC["empty middle segments"]), "onset_pitch")
  assert [len(s) for s in gaps] == [5, 3, 3, 3, 5]


def test_empty_piece():
  for stage in V.STAGES:
    segments = V.encode_piece(notes.Notes.empty(), stage)
    assert [s.tolist() for s in segments] == [[SOS, V.TASK_IDS[stage], EOS]]
    assert len(V.decode_piece(segments, stage)) == 0
  assert len(V.decode_piece([], "flatten")) == 0


def test_decode_segment_tolerates_garbage():
  tokens = [SOS, 5, t(10), p(60), t(20), v(50),
            3, p(61),                   # unk and a pitch where an onset must come: skipped
            t(30), t(40), p(62), SUS, v(60),  # a second time restarts the group at t(40)
            t(70), p(63), t(75), t(80),  # a time where a velocity must come: the group restarts
            p(64), t(90), v(7),
            t(50), p(65), t(50), v(1),   # offset not after onset: dropped
            5000, -3,                   # ids outside the vocabulary: skipped
            t(95), p(66), EOS, v(9), t(1), p(1), t(2), v(2)]  # incomplete at eos; after eos ignored
  got = V.decode_segment(np.array(tokens), "flatten")
  assert {k: a.tolist() for k, a in got.items()} == {
      "onset": [10, 40, 80], "pitch": [60, 62, 64], "offset": [20, V.SUSTAIN_STEP, 90],
      "velocity": [50, 60, 7]}
  got = V.decode_segment([SOS, 5, SUS, p(60), t(5), v(3), p(61), t(7), p(62), EOS], "onset_pitch")
  assert {k: a.tolist() for k, a in got.items()} == {"onset": [5, 7], "pitch": [61, 62]}


def test_decode_piece_stitching_of_malformed_sustains():
  segments = [
      [SOS, 5, SUS, p(50), t(100), v(1),    # continues nothing: dropped
       t(100), p(60), SUS, v(10),           # continued below
       t(200), p(61), SUS, v(11), EOS],     # not continued: ends at the next segment start
      [SOS, 5, SUS, p(60), SUS, v(99), EOS],  # velocity of a continuation is the opening one's
      [SOS, 5, SUS, p(60), SUS, v(0), t(300), p(62), SUS, v(12), EOS],  # never closed: end with the piece
  ]
  back = V.decode_piece([np.array(s) for s in segments], "flatten")
  rows = sorted(zip(back.onset.tolist(), back.offset.tolist(), back.pitch.tolist(), back.velocity.tolist()))
  assert rows == [(1.0, 30.0, 60, 10), (2.0, 10.0, 61, 11), (23.0, 30.0, 62, 12)]


def test_pad():
  tokens, mask = V.encode_segment(_SEGMENT_NOTES, 10.0, "velocity")
  padded, padded_mask, truncated = V.pad(tokens, mask, 20)
  assert not truncated and padded.dtype == np.int32 and padded.shape == (20,)
  assert padded.tolist() == tokens.tolist() + [0] * 8
  assert padded_mask.tolist() == mask.tolist() + [False] * 8
  cut, cut_mask, truncated = V.pad(tokens, mask, 5)
  assert truncated and cut.tolist() == tokens[:5].tolist() and cut_mask.tolist() == mask[:5].tolist()
  assert not V.pad(tokens, mask, len(tokens))[2]
  with pytest.raises(ValueError, match="differ in length"):
    V.pad(tokens, mask[:-1], 20)


def test_encode_segment_is_vectorised(maestro):
  n = max(maestro, key=len)  # the longest piece: a per-note Python loop would take many ms
  starts = np.arange(0, n.offset.max(), 10.0)
  begin = time.perf_counter()
  for start in starts:
    V.encode_segment(n, start, "flatten")
  assert (time.perf_counter() - begin) / len(starts) < 5e-3
