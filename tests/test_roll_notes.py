"""Tests for hiermt.roll_notes: Kong's and HPPNet's note extraction on hand-built rolls.

Expected notes are worked out by hand from the reference rules (see the
module docstring); roll values are dyadic so the float32 arithmetic is exact.
"""

import numpy as np
import pytest

from hiermt import notes as notes_lib
from hiermt import roll_notes

C4 = 60 - 21  # column of MIDI pitch 60


def _rolls(frames):
  return {name: np.zeros((frames, 88), np.float32) for name in roll_notes.ROLL_NAMES}


def _assert_notes(notes, expected):
  """expected: [(onset s, offset s, pitch, velocity)] in the order of `notes`."""
  expected = np.array(expected, np.float64).reshape(-1, 4)
  assert len(notes) == len(expected)
  np.testing.assert_allclose(notes.onset, expected[:, 0], rtol=0, atol=1e-6)
  np.testing.assert_allclose(notes.offset, expected[:, 1], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(notes.pitch, expected[:, 2])
  np.testing.assert_array_equal(notes.velocity, expected[:, 3])


# --- CRNN (Kong's RegressionPostProcessor), 100 fps ---


def _crnn_note(rolls, frame, peak, key=C4, velocity=0.5, held_until=None):
  """An onset regression peak (values around `frame`), velocity there, frame roll on from `frame`."""
  rolls["onset"][frame - len(peak) // 2:frame + len(peak) // 2 + 1, key] = peak
  rolls["velocity"][frame, key] = velocity
  if held_until is not None:
    rolls["frame"][frame:held_until, key] = 0.5


def test_crnn_onset_shift_rising_side():
  rolls = _rolls(100)
  # Peak 0.75 at frame 10, neighbours 0.25 before and 0.5 after: the lower neighbour is before, so
  # shift = (after - before) / (peak - before) / 2 = 0.25 / 0.5 / 2 = 0.25 frames.
  _crnn_note(rolls, 10, [0.125, 0.25, 0.75, 0.5, 0.125], held_until=30)
  # The frame roll is 0 from frame 30: the note ends there, without an offset shift.
  _assert_notes(roll_notes.crnn_notes(rolls), [(0.1025, 0.30, 60, 64)])


def test_crnn_onset_shift_falling_side():
  rolls = _rolls(100)
  # Lower neighbour after: shift = (after - before) / (peak - after) / 2 = -0.25 / 0.5 / 2.
  _crnn_note(rolls, 10, [0.125, 0.5, 0.75, 0.25, 0.125], held_until=30)
  _assert_notes(roll_notes.crnn_notes(rolls), [(0.0975, 0.30, 60, 64)])


def test_crnn_onset_needs_monotonic_neighbourhood():
  rolls = _rolls(100)
  # 0.625 two frames before the peak falls to 0.5: not monotonic, so no onset.
  _crnn_note(rolls, 10, [0.625, 0.5, 0.75, 0.5, 0.125], held_until=30)
  assert len(roll_notes.crnn_notes(rolls)) == 0
  rolls["onset"][8, C4] = 0.5
  assert len(roll_notes.crnn_notes(rolls)) == 1


def test_crnn_onsets_too_near_the_edges_are_not_peaks():
  rolls = _rolls(20)
  rolls["onset"][1, 0] = 0.75  # needs 2 frames before it
  rolls["onset"][18, 1] = 0.75  # and 2 after it
  rolls["onset"][2, 2] = 0.75
  rolls["onset"][17, 3] = 0.75
  notes = roll_notes.crnn_notes(rolls)
  np.testing.assert_array_equal(notes.pitch, [23, 24])
  np.testing.assert_allclose(notes.onset, [0.02, 0.17], atol=1e-6)


def test_crnn_offset_peak_ends_note():
  rolls = _rolls(100)
  _crnn_note(rolls, 10, [0.5, 1.0, 0.5], held_until=40)
  # Offset peak at 35 (4 monotonic frames each side), shift (0.75 - 0.5) / (1 - 0.5) / 2 = 0.25.
  rolls["offset"][31:40, C4] = [0.125, 0.25, 0.375, 0.5, 1.0, 0.75, 0.375, 0.25, 0.125]
  # It is nearer to where the frame roll ends (frame 40) than to the onset: the note ends there.
  _assert_notes(roll_notes.crnn_notes(rolls), [(0.10, 0.3525, 60, 64)])


def test_crnn_offset_peak_needs_four_monotonic_frames_each_side():
  rolls = _rolls(100)
  _crnn_note(rolls, 10, [0.5, 1.0, 0.5], held_until=40)
  # Monotonic over 3 frames before the peak at 35, but 4 frames before it rises: no offset peak.
  rolls["offset"][31:40, C4] = [0.5, 0.25, 0.375, 0.5, 1.0, 0.75, 0.375, 0.25, 0.125]
  _assert_notes(roll_notes.crnn_notes(rolls), [(0.10, 0.40, 60, 64)])


def test_crnn_offset_peak_near_onset_loses_to_frame_end():
  rolls = _rolls(100)
  _crnn_note(rolls, 10, [0.5, 1.0, 0.5], held_until=30)
  # Offset peak at 20: 20 - 10 > 30 - 20 fails, so the note ends where the frame roll drops.
  rolls["offset"][16:25, C4] = [0.125, 0.25, 0.375, 0.5, 1.0, 0.75, 0.375, 0.25, 0.125]
  _assert_notes(roll_notes.crnn_notes(rolls), [(0.10, 0.30, 60, 64)])
  rolls["frame"][10:29, C4] = 0.5
  rolls["frame"][29, C4] = 0  # now 20 - 10 > 29 - 20
  _assert_notes(roll_notes.crnn_notes(rolls), [(0.10, 0.2025, 60, 64)])


def test_crnn_max_length_cap():
  rolls = _rolls(700)
  _crnn_note(rolls, 10, [0.5, 1.0, 0.5], held_until=700)
  # Never released: Kong cuts the note 600 frames after its onset.
  _assert_notes(roll_notes.crnn_notes(rolls), [(0.10, 6.10, 60, 64)])


def test_crnn_frame_end_on_the_cap_frame_wins():
  rolls = _rolls(700)
  _crnn_note(rolls, 10, [0.5, 1.0, 0.5], held_until=610)
  rolls["offset"][496:505, C4] = [0.125, 0.25, 0.375, 0.5, 1.0, 0.75, 0.375, 0.25, 0.125]
  # The frame roll drops on frame 610, the cap: the frame rule applies and picks the offset peak.
  _assert_notes(roll_notes.crnn_notes(rolls), [(0.10, 5.0025, 60, 64)])


def test_crnn_note_held_to_the_end_ends_on_last_frame():
  rolls = _rolls(100)
  _crnn_note(rolls, 10, [0.5, 1.0, 0.5], held_until=100)
  _assert_notes(roll_notes.crnn_notes(rolls), [(0.10, 0.99, 60, 64)])


def test_crnn_repeated_note_is_cut_before_next_onset():
  rolls = _rolls(100)
  _crnn_note(rolls, 10, [0.5, 1.0, 0.5], velocity=0.25, held_until=61)
  _crnn_note(rolls, 30, [0.5, 1.0, 0.5], velocity=0.75)
  # An offset peak on the cut frame does not shift the cut.
  rolls["offset"][25:34, C4] = [0.125, 0.25, 0.375, 0.5, 1.0, 0.75, 0.375, 0.25, 0.125]
  _assert_notes(roll_notes.crnn_notes(rolls), [(0.10, 0.29, 60, 32), (0.30, 0.61, 60, 96)])


def test_crnn_next_onset_wins_over_frame_end_on_the_same_frame():
  rolls = _rolls(100)
  _crnn_note(rolls, 10, [0.5, 1.0, 0.5], held_until=30)
  _crnn_note(rolls, 30, [0.5, 1.0, 0.5])  # the frame roll is 0 from frame 30
  _assert_notes(roll_notes.crnn_notes(rolls), [(0.10, 0.29, 60, 64), (0.30, 0.31, 60, 64)])


def test_crnn_short_valid_note_is_kept():
  rolls = _rolls(100)
  _crnn_note(rolls, 10, [0.125, 0.25, 0.75, 0.5, 0.125], held_until=11)  # onset 10.25 frames
  # Offset peak on frame 11, where the frame roll ends, shifted by (0.25 - 0.5) / (0.75 - 0.25) / 2.
  rolls["offset"][7:16, C4] = [0.125, 0.25, 0.375, 0.5, 0.75, 0.25, 0.125, 0.0625, 0.0]
  # Half a frame long: Kong's note, not stretched to a frame.
  _assert_notes(roll_notes.crnn_notes(rolls), [(0.1025, 0.1075, 60, 64)])


@pytest.mark.parametrize("value, velocity", [
    (0.5, 64),
    (0.35, 44),  # 44.8: truncated, as Kong's int(), not rounded
    (0.999, 127),
    (1.0, 127),  # Kong's 128, clipped to MIDI
    (0.0, 1),  # Kong's 0: a note needs a velocity
])
def test_crnn_velocity_read_at_onset_frame(value, velocity):
  rolls = _rolls(100)
  _crnn_note(rolls, 10, [0.5, 1.0, 0.5], velocity=value, held_until=30)
  rolls["velocity"][9, C4] = rolls["velocity"][11, C4] = 0.9  # neighbouring frames do not count
  assert roll_notes.crnn_notes(rolls).velocity.tolist() == [velocity]


def test_crnn_plateau_onsets_give_valid_notes():
  rolls = _rolls(100)
  # Two equal tops: both are peaks, shifted +0.5 and -0.5 to the same time 10.5 frames. Kong cuts
  # the first at frame 10, before its onset; here it lasts one frame instead.
  _crnn_note(rolls, 10, [0.0, 0.25, 0.75, 0.75, 0.25], held_until=30)
  _assert_notes(roll_notes.crnn_notes(rolls), [(0.105, 0.115, 60, 64), (0.105, 0.30, 60, 1)])


def test_crnn_flat_top_peaks_stay_on_their_frames():
  rolls = _rolls(100)
  rolls["onset"][8:13, C4] = 0.5
  rolls["frame"][8:40, C4] = 0.5
  # Frames 9..11 have equal neighbours (Kong's 0 / 0); the plateau's ends shift by +-0.5.
  notes = roll_notes.crnn_notes(rolls)
  np.testing.assert_allclose(notes.onset, [0.085, 0.09, 0.10, 0.11, 0.115], atol=1e-6)
  assert np.all(notes.offset > notes.onset)


def test_crnn_pitch_columns():
  rolls = _rolls(100)
  _crnn_note(rolls, 10, [0.5, 1.0, 0.5], key=0, held_until=30)
  _crnn_note(rolls, 10, [0.5, 1.0, 0.5], key=87, held_until=30)
  assert roll_notes.crnn_notes(rolls).pitch.tolist() == [21, 108]


def test_crnn_thresholds():
  rolls = _rolls(100)
  _crnn_note(rolls, 10, [0.125, 0.25, 0.125], held_until=20)  # peak 0.25 < default 0.3
  rolls["frame"][20:30, C4] = 0.125  # above the default frame threshold 0.1
  assert len(roll_notes.rolls_to_notes(rolls, "crnn", 100)) == 0
  _assert_notes(roll_notes.rolls_to_notes(rolls, "crnn", 100, {"onset": 0.2}), [(0.10, 0.30, 60, 64)])
  # A peak must exceed the threshold, not just reach it.
  assert len(roll_notes.rolls_to_notes(rolls, "crnn", 100, {"onset": 0.25})) == 0
  # A frame roll equal to the threshold ends the note.
  _assert_notes(roll_notes.rolls_to_notes(rolls, "crnn", 100, {"onset": 0.2, "frame": 0.125}),
                [(0.10, 0.20, 60, 64)])


def test_crnn_offset_threshold():
  rolls = _rolls(100)
  _crnn_note(rolls, 10, [0.5, 1.0, 0.5], held_until=40)
  rolls["offset"][31:40, C4] = [0.0, 0.0, 0.0, 0.0, 0.25, 0.0, 0.0, 0.0, 0.0]
  _assert_notes(roll_notes.crnn_notes(rolls), [(0.10, 0.40, 60, 64)])
  _assert_notes(roll_notes.crnn_notes(rolls, offset_threshold=0.2), [(0.10, 0.35, 60, 64)])


def test_crnn_frames_per_second():
  rolls = _rolls(100)
  _crnn_note(rolls, 10, [0.5, 1.0, 0.5], held_until=30)
  _assert_notes(roll_notes.crnn_notes(rolls, frames_per_second=50), [(0.20, 0.60, 60, 64)])


@pytest.mark.parametrize("frames", [0, 3, 100])
def test_crnn_no_notes(frames):
  assert len(roll_notes.crnn_notes(_rolls(frames))) == 0


# --- HPPNet (extract_notes and save_midi), 50 fps ---


def test_hppnet_onset_peak_picking():
  rolls = _rolls(20)
  # Frames 1..3 exceed 0.4 but only frame 2 is a peak: one note from frame 2.
  rolls["onset"][0:5, C4] = [0.0, 0.5, 0.875, 0.625, 0.0]
  # Two peaks with a dip between them: two notes.
  rolls["onset"][0:5, 0] = [0.0, 0.875, 0.5, 0.875, 0.0]
  notes = roll_notes.hppnet_notes(rolls)
  assert notes.pitch.tolist() == [21, 60, 21]
  np.testing.assert_allclose(notes.onset, [0.02, 0.04, 0.06])


def test_hppnet_plateau_is_one_note_with_mean_velocity():
  rolls = _rolls(20)
  rolls["onset"][1:3, C4] = 0.875
  rolls["velocity"][1:4, C4] = [0.5, 0.75, 1.0]  # frame 3 is not an onset frame
  # int(mean(0.5, 0.75) * 127) = int(79.375).
  _assert_notes(roll_notes.hppnet_notes(rolls), [(0.02, 0.04, 60, 79)])


def test_hppnet_edge_frames_can_be_onsets():
  rolls = _rolls(20)
  rolls["onset"][0, 0] = 0.875
  rolls["onset"][19, 1] = 0.875
  _assert_notes(roll_notes.hppnet_notes(rolls), [(0.0, 0.02, 21, 1), (0.38, 0.40, 22, 1)])


def test_hppnet_offset_from_frame_run_after_onset():
  rolls = _rolls(20)
  rolls["onset"][2, C4] = 0.875
  rolls["frame"][3:10, C4] = 0.875  # the frame at the onset itself is not looked at
  rolls["frame"][10, C4] = 0.4  # not above the 0.4 threshold
  rolls["offset"][5, C4] = 1.0  # the offset roll is not used
  # HPPNet: offset = onset + run length from onset + 1 = 2 + 7.
  _assert_notes(roll_notes.hppnet_notes(rolls), [(0.04, 0.18, 60, 1)])


def test_hppnet_note_without_frames_lasts_one_frame():
  rolls = _rolls(20)
  rolls["onset"][2, C4] = 0.875
  rolls["frame"][2, C4] = 1.0
  rolls["frame"][4:8, C4] = 1.0
  _assert_notes(roll_notes.hppnet_notes(rolls), [(0.04, 0.06, 60, 1)])


def test_hppnet_max_length():
  rolls = _rolls(1200)
  rolls["onset"][2, C4] = 0.875
  rolls["frame"][:, C4] = 1.0
  _assert_notes(roll_notes.hppnet_notes(rolls), [(0.04, 20.04, 60, 1)])


def _restruck_key():
  """C4 struck at frames 2 and 6 (an onset plateau over 6-7) while its frame roll stays on to frame 12."""
  rolls = _rolls(20)
  rolls["onset"][2, C4] = 0.875
  rolls["onset"][6:8, C4] = 0.875
  rolls["frame"][2:12, C4] = 0.875
  return rolls


def test_hppnet_new_onset_ends_the_sounding_note():
  # The first note ends where the second starts (frame 6), not at the frame roll's last frame (11,
  # HPPNet's end); the second runs to frame 11.
  _assert_notes(roll_notes.hppnet_notes(_restruck_key()), [(0.04, 0.12, 60, 1), (0.12, 0.22, 60, 1)])
  _assert_notes(roll_notes.rolls_to_notes(_restruck_key(), "hppnet", 50),
                [(0.04, 0.12, 60, 1), (0.12, 0.22, 60, 1)])


def test_hppnet_published_rule_runs_through_a_new_onset():
  # HPPNet's extract_notes: both notes last while the frame roll is on, so they overlap.
  expected = [(0.04, 0.22, 60, 1), (0.12, 0.22, 60, 1)]
  _assert_notes(roll_notes.hppnet_notes(_restruck_key(), cut_at_onset=False), expected)
  _assert_notes(roll_notes.rolls_to_notes(_restruck_key(), "hppnet", 50, {"cut_at_onset": False}), expected)


def test_hppnet_cut_keeps_other_keys_and_one_frame_notes():
  rolls = _restruck_key()
  rolls["onset"][3, C4 + 1] = 0.875  # another key between the strokes is not a new onset of C4
  rolls["onset"][8, C4] = 0.0
  rolls["onset"][9, C4] = 0.875  # peaks at 6-7 and at 9: the run from 6 ends at 9
  rolls["frame"][3:5, C4 + 1] = 0.875
  # C#4: frame 4 held after its onset at 3, so it ends at 4. C4's last stroke holds frames 10-11.
  _assert_notes(roll_notes.hppnet_notes(rolls),
                [(0.04, 0.12, 60, 1), (0.06, 0.08, 61, 1), (0.12, 0.18, 60, 1), (0.18, 0.22, 60, 1)])


@pytest.mark.parametrize("value, velocity", [
    (0.5, 63),  # 63.5 truncated; save_midi scales by 127, not 128
    (1.0, 127),
    (0.0, 1),
])
def test_hppnet_velocity_scale(value, velocity):
  rolls = _rolls(20)
  rolls["onset"][2, C4] = 0.875
  rolls["velocity"][2, C4] = value
  assert roll_notes.hppnet_notes(rolls).velocity.tolist() == [velocity]


def test_hppnet_thresholds():
  rolls = _rolls(20)
  rolls["onset"][2, C4] = 0.375
  rolls["frame"][3:6, C4] = 0.375
  assert len(roll_notes.rolls_to_notes(rolls, "hppnet", 50)) == 0
  _assert_notes(roll_notes.rolls_to_notes(rolls, "hppnet", 50, {"onset": 0.25}), [(0.04, 0.06, 60, 1)])
  assert len(roll_notes.rolls_to_notes(rolls, "hppnet", 50, {"onset": 0.375})) == 0  # must exceed it
  _assert_notes(roll_notes.rolls_to_notes(rolls, "hppnet", 50, {"onset": 0.25, "frame": 0.25}),
                [(0.04, 0.10, 60, 1)])


def test_hppnet_pitch_columns_and_frame_rate():
  rolls = _rolls(20)
  rolls["onset"][2, [0, 87]] = 0.875
  _assert_notes(roll_notes.hppnet_notes(rolls, frames_per_second=100),
                [(0.02, 0.03, 21, 1), (0.02, 0.03, 108, 1)])


@pytest.mark.parametrize("frames", [0, 1, 20])
def test_hppnet_no_notes(frames):
  rolls = _rolls(frames)
  if frames == 1:
    rolls["onset"][:] = 1.0  # HPPNet's peak picking needs two frames
  assert len(roll_notes.hppnet_notes(rolls)) == 0


# --- dispatch and validation ---


def test_default_thresholds():
  assert roll_notes.DEFAULT_THRESHOLDS == {"crnn": {"onset": 0.3, "offset": 0.3, "frame": 0.1},
                                           "hppnet": {"onset": 0.4, "frame": 0.4}}


def test_rolls_to_notes_dispatches_on_encoder():
  rolls = _rolls(100)
  _crnn_note(rolls, 10, [0.5, 1.0, 0.5], held_until=30)
  _assert_notes(roll_notes.rolls_to_notes(rolls, "crnn", 100), [(0.10, 0.30, 60, 64)])
  _assert_notes(roll_notes.rolls_to_notes(rolls, "hppnet", 50), [(0.20, 0.58, 60, 63)])


def test_unknown_encoder():
  with pytest.raises(ValueError, match="crnn, hppnet"):
    roll_notes.rolls_to_notes(_rolls(10), "onsets_frames", 100)


def test_unknown_threshold():
  with pytest.raises(ValueError, match="valid keys: onset, frame, cut_at_onset"):
    roll_notes.rolls_to_notes(_rolls(10), "hppnet", 50, {"offset": 0.5})


@pytest.mark.parametrize("decode", [roll_notes.crnn_notes, roll_notes.hppnet_notes])
def test_bad_rolls(decode):
  rolls = _rolls(10)
  with pytest.raises(ValueError, match="lack"):
    decode({name: roll for name, roll in rolls.items() if name != "velocity"})
  with pytest.raises(ValueError, match=r"shape \[frames, 88\]"):
    decode(rolls | {"frame": np.zeros((10, 87))})
  with pytest.raises(ValueError, match=r"shape \[frames, 88\]"):
    decode(rolls | {"onset": np.zeros((1, 10, 88))})
  with pytest.raises(ValueError, match="same number of frames"):
    decode(rolls | {"offset": np.zeros((11, 88))})
  with pytest.raises(ValueError, match="non-finite"):
    decode(rolls | {"onset": np.full((10, 88), np.nan)})
  with pytest.raises(ValueError, match="frames_per_second"):
    decode(rolls, 0)


def test_extra_keys_and_dtypes_are_accepted():
  rolls = _rolls(100)
  _crnn_note(rolls, 10, [0.5, 1.0, 0.5], held_until=30)
  as_float64 = {name: roll.astype(np.float64) for name, roll in rolls.items()}
  _assert_notes(roll_notes.crnn_notes(as_float64 | {"features": np.zeros(3)}), [(0.10, 0.30, 60, 64)])


@pytest.mark.parametrize("encoder", ["crnn", "hppnet"])
def test_calibration_keeps_the_published_thresholds_when_nothing_is_better(encoder):
  """Rolls that find no note at any threshold: every value ties, and a tie keeps the starting one."""
  reference = notes_lib.Notes.create(np.array([0.2]), np.array([0.5]), np.array([60]), np.array([64]))
  thresholds, result = roll_notes.calibrate([(_rolls(100), reference, 2.0)], encoder, 50)
  assert thresholds == roll_notes.DEFAULT_THRESHOLDS[encoder]
  assert result["onset_f1"] == 0


def test_calibration_tunes_the_onset_threshold_only():
  """Kong's rolls: an onset peak of 0.25 (under the published 0.3) at frame 20, and an offset peak of 0.25
  (also under 0.3) where the note ends. Onset by On F1: 0.2, the nearest grid value to 0.3 under 0.25;
  the offset threshold stays published, so the note ends where the frame roll does (frame 70), not at
  the offset peak (frame 60): On F1 1, On-Off F1 0."""
  rolls = _rolls(200)
  _crnn_note(rolls, 20, [0.125, 0.25, 0.125], held_until=70)
  rolls["offset"][56:65, C4] = [0.0, 0.0625, 0.125, 0.1875, 0.25, 0.1875, 0.125, 0.0625, 0.0]  # peak at 60
  reference = notes_lib.Notes.create(np.array([0.2]), np.array([0.6]), np.array([60]), np.array([64]))
  thresholds, result = roll_notes.calibrate([(rolls, reference, 2.0)], "crnn", 100)
  assert thresholds == {"onset": 0.2, "offset": 0.3, "frame": 0.1}
  assert (result["onset_f1"], result["onset_offset_f1"]) == (1.0, 0.0)
  _assert_notes(roll_notes.rolls_to_notes(rolls, "crnn", 100, thresholds), [(0.2, 0.7, 60, 64)])
