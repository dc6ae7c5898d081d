"""Tests for hiermt.data.rolls: hand-computed encoder targets."""

import numpy as np
import pytest

from hiermt import notes
from hiermt.data import rolls

KEYS = ("frame", "onset", "offset", "velocity", "onset_mask", "mask")


def _targets(rows, start=0.0, num_frames=1001, fps=100):
  onset, offset, pitch, velocity = zip(*rows)
  return rolls.kong_targets(notes.Notes.create(onset, offset, pitch, velocity), start, num_frames, fps)


def _column(values, num_frames):
  col = np.zeros(num_frames, np.float32)
  for frame, value in values.items():
    col[frame] = value
  return col


def _only_key(roll, key, column):
  """Asserts `roll` is `column` on `key` and zero on every other key."""
  np.testing.assert_allclose(roll[:, key], column, atol=1e-6)
  np.testing.assert_array_equal(np.delete(roll, key, axis=1), 0)


@pytest.mark.parametrize("start", [0.0, 10.37])
def test_single_note_at_100_fps(start):
  r = _targets([(start + 1.003, start + 1.5, 60, 64)], start=start)
  assert set(r) == set(KEYS)
  for roll in r.values():
    assert roll.shape == (1001, 88) and roll.dtype == np.float32
  key = 60 - 21
  _only_key(r["onset"], key, _column({96: .14, 97: .34, 98: .54, 99: .74, 100: .94, 101: .86, 102: .66,
                                      103: .46, 104: .26, 105: .06}, 1001))
  _only_key(r["offset"], key, _column({146: .2, 147: .4, 148: .6, 149: .8, 150: 1.0, 151: .8, 152: .6,
                                       153: .4, 154: .2}, 1001))
  _only_key(r["frame"], key, _column({i: 1.0 for i in range(100, 151)}, 1001))
  _only_key(r["velocity"], key, _column({100: 0.5}, 1001))
  _only_key(r["onset_mask"], key, _column({100: 1.0}, 1001))
  np.testing.assert_array_equal(r["mask"], 1)


def test_single_note_at_50_fps():
  r = _targets([(1.003, 1.5, 60, 96)], num_frames=501, fps=50)
  key = 60 - 21
  assert r["frame"].shape == (501, 88)
  _only_key(r["onset"], key, _column({48: .14, 49: .54, 50: .94, 51: .66, 52: .26}, 501))
  _only_key(r["offset"], key, _column({73: .2, 74: .6, 75: 1.0, 76: .6, 77: .2}, 501))
  _only_key(r["frame"], key, _column({i: 1.0 for i in range(50, 76)}, 501))
  _only_key(r["velocity"], key, _column({50: 0.75}, 501))


def test_note_crossing_the_crop_start_is_masked():
  r = _targets([(4.0, 12.3, 60, 30), (10.5, 11.0, 62, 30)], start=10.0)
  key = 60 - 21
  np.testing.assert_array_equal(r["frame"][:, key], _column({i: 1.0 for i in range(231)}, 1001))
  np.testing.assert_array_equal(r["mask"][:, key], 1 - _column({i: 1.0 for i in range(231)}, 1001))
  np.testing.assert_array_equal(np.delete(r["mask"], key, axis=1), 1)
  assert r["offset"][230, key] == pytest.approx(1.0)
  for name in ("onset", "velocity", "onset_mask"):
    assert not r[name][:, key].any(), name
  assert r["onset_mask"][50, key + 2] == 1  # the other note is untouched


def test_note_crossing_the_crop_end_has_no_offset():
  r = _targets([(19.5, 25.0, 100, 64)], start=10.0)
  key = 100 - 21
  np.testing.assert_array_equal(r["frame"][:, key], _column({i: 1.0 for i in range(950, 1001)}, 1001))
  assert r["onset"][950, key] == pytest.approx(1.0) and r["onset"][946, key] == pytest.approx(0.2)
  assert not r["offset"].any()
  np.testing.assert_array_equal(r["mask"], 1)


def test_notes_outside_the_crop_or_keyboard_are_ignored():
  r = _targets([(0.0, 5.0, 60, 10), (25.0, 30.0, 60, 10), (11.0, 12.0, 20, 10), (11.0, 12.0, 109, 10)],
               start=10.0)
  for name in ("frame", "onset", "offset", "velocity", "onset_mask"):
    assert not r[name].any(), name
  np.testing.assert_array_equal(r["mask"], 1)


def test_close_onsets_take_the_nearest_not_the_sum():
  r = _targets([(1.0, 1.05, 60, 10), (1.06, 1.2, 60, 20)])
  key = 60 - 21
  assert r["onset"][100, key] == pytest.approx(1.0) and r["onset"][106, key] == pytest.approx(1.0)
  assert r["onset"][103, key] == pytest.approx(0.4)
  np.testing.assert_array_equal(r["frame"][100:121, key], 1)  # 100..105 and 106..120 join up


def test_bad_arguments():
  with pytest.raises(ValueError, match="positive"):
    rolls.kong_targets(notes.Notes.empty(), 0.0, 0, 100)
  r = rolls.kong_targets(notes.Notes.empty(), 0.0, 11, 100)
  assert r["frame"].shape == (11, 88) and not r["frame"].any()


def _hpp(rows, start=0.0, num_frames=20, fps=50):
  onset, offset, pitch, velocity = zip(*rows)
  return rolls.hppnet_targets(notes.Notes.create(onset, offset, pitch, velocity), start, num_frames, fps)


def test_hppnet_targets_one_frame_onsets_and_offsets():
  # Pitch 60 (key 39): onset at 0.1 s = frame 5, offset at 0.2 s = frame 10, velocity 64.
  t = _hpp([(0.1, 0.2, 60, 64)])
  _only_key(t["onset"], 39, _column({5: 1}, 20))
  _only_key(t["frame"], 39, _column({f: 1 for f in range(5, 10)}, 20))
  _only_key(t["offset"], 39, _column({10: 1}, 20))
  _only_key(t["velocity"], 39, _column({f: 0.5 for f in range(5, 10)}, 20))


def test_hppnet_targets_crop_and_overwrite_as_the_official_loop():
  # Crop 0.1..0.3 s (frames 0..9). Pitch 60: a note begun before the crop (frames only,
  # its offset frame 5 then overwritten by the next note's onset), re-struck at 0.2 s
  # (frame 5). Pitch 62: its offset lies after the crop.
  t = _hpp([(0.0, 0.2, 60, 100), (0.2, 0.5, 60, 32), (0.2, 1.0, 62, 16)], start=0.1, num_frames=10)
  np.testing.assert_array_equal(t["onset"][:, 39], _column({5: 1}, 10))
  np.testing.assert_array_equal(t["frame"][:, 39], np.ones(10))  # onset frames count as frames
  np.testing.assert_array_equal(t["offset"][:, 39], np.zeros(10))
  np.testing.assert_allclose(t["velocity"][:, 39], [100 / 128] * 5 + [32 / 128] * 5)
  np.testing.assert_array_equal(t["onset"][:, 41], _column({5: 1}, 10))
  np.testing.assert_array_equal(t["frame"][:, 41], _column({f: 1 for f in range(5, 10)}, 10))
  np.testing.assert_array_equal(t["offset"][:, 41], np.zeros(10))
