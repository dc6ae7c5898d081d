"""Frame-level piano-roll targets for pretraining the roll-based encoders.

Each encoder is pretrained on its authors' targets (`hiermt.objectives` picks
them by encoder name), computed for a crop of `num_frames` frames starting at
`start` seconds, frame i sitting at time start + i / fps.

`kong_targets`, after Kong et al. (2021) (the CRNN):

  frame     1 on frames round(t_on * fps) .. round(t_off * fps), both ends
            included (Kong's convention), clipped to the crop.
  onset     regression target: at frame i, the largest over the pitch's
            onsets t of max(0, 1 - |i / fps - t| / 0.05), t the exact
            (unquantised) crop-relative onset time: a triangle 0.05 s wide on
            each side in seconds, whatever the frame rate (non-zero up to ±5
            frames from the onset frame at 100 fps, ±2 at 50 fps). Only
            onsets whose rounded frame lies inside the crop contribute.
  offset    the same triangle around offsets whose rounded frame lies inside.
  velocity  velocity / 128 on onset frames, 0 elsewhere.
  onset_mask  1 on onset frames: the mask of the velocity loss.
  mask      0 on frames 0 .. round(t_off * fps) of a pitch whose note began
            before the crop (its onset is not in the audio), 1 elsewhere: the
            mask of the frame, onset and offset losses.

Kong's code measures the distance partly in frames and partly in seconds and
splits each pitch's frames at midpoints between onsets; the triangle here is
the distance to the nearest onset in seconds, which is what that code aims at.
`hppnet_targets`, after HPPNet's `dataset.py` (Onsets-and-Frames style labels,
one frame each for onsets and offsets at 50 fps): notes are written in onset
order, a later note overwriting an earlier one, with on = round(t_on * fps)
and off = min(round(t_off * fps), frames):

  onset     1 on frame on
  frame     1 on frames on .. off - 1
  offset    1 on frame off (when inside the crop), unless a later note's
            onset or frames overwrite it
  velocity  velocity / 128 on frames on .. off - 1 (the loss reads it at onsets)

All arrays are float32 [num_frames, 88] over MIDI pitches 21..108; notes
outside that range are ignored.
"""

import math

import numpy as np

from hiermt import notes as notes_lib

MIN_PITCH = 21
NUM_KEYS = 88
REGRESSION_SECONDS = 0.05


def _triangles(times, keys, num_frames, fps):
  """float32 [num_frames, NUM_KEYS]: the regression triangles around `times` (seconds) per key."""
  out = np.zeros((num_frames, NUM_KEYS), np.float32)
  reach = math.ceil(REGRESSION_SECONDS * fps)
  centre = np.rint(times * fps).astype(np.int64)  # [n]
  frames = centre[:, None] + np.arange(-reach, reach + 1)  # [n, 2 * reach + 1]
  value = 1.0 - np.abs(frames / fps - times[:, None]) / REGRESSION_SECONDS
  inside = (frames >= 0) & (frames < num_frames) & (value > 0)
  np.maximum.at(out, (frames[inside], np.broadcast_to(keys[:, None], frames.shape)[inside]),
                value[inside].astype(np.float32))
  return out


def _spans(first, last, keys, num_frames):
  """float32 [num_frames, NUM_KEYS]: 1 on frames first..last (inclusive, within the crop) of each key."""
  out = np.zeros((num_frames, NUM_KEYS), np.float32)
  lengths = np.maximum(last - first + 1, 0)  # [n]
  # Frame indices of all spans back to back: each span's first frame, then +1 per step.
  starts = np.cumsum(lengths) - lengths
  frames = np.repeat(first - starts, lengths) + np.arange(lengths.sum())
  out[frames, np.repeat(keys, lengths)] = 1.0
  return out


def _check_crop(num_frames, fps):
  if num_frames <= 0 or fps <= 0:
    raise ValueError(f"num_frames and fps must be positive, got {num_frames} and {fps}")


def kong_targets(notes: notes_lib.Notes, start: float, num_frames: int, fps: float) -> dict[str, np.ndarray]:
  """The CRNN's pretraining targets of the crop [start, start + num_frames / fps) (Kong et al.).

  Args:
    notes: the piece's notes (sustain-extended), in seconds.
    start: crop start in seconds.
    num_frames: frames in the crop (1001 for 10 s at 100 fps, 501 at 50 fps).
    fps: frames per second.

  Returns:
    float32 [num_frames, 88] arrays "frame", "onset", "offset", "velocity",
    "onset_mask", "mask" (see the module docstring).
  """
  _check_crop(num_frames, fps)
  # Notes starting after the crop cannot reach it; onsets are sorted, so cut them off at once.
  stop = np.searchsorted(notes.onset, start + num_frames / fps, side="right")
  t_on = notes.onset[:stop] - start  # [n] seconds, crop-relative
  t_off = notes.offset[:stop] - start
  first, last = np.rint(t_on * fps).astype(np.int64), np.rint(t_off * fps).astype(np.int64)
  keys = notes.pitch[:stop].astype(np.int64) - MIN_PITCH
  keep = (last >= 0) & (first < num_frames) & (keys >= 0) & (keys < NUM_KEYS)
  t_on, t_off, first, last, keys = t_on[keep], t_off[keep], first[keep], last[keep], keys[keep]
  velocity = notes.velocity[:stop][keep]

  has_onset = first >= 0
  has_offset = last < num_frames
  clipped_last = np.minimum(last, num_frames - 1)
  onset_mask = np.zeros((num_frames, NUM_KEYS), np.float32)
  onset_mask[first[has_onset], keys[has_onset]] = 1.0
  velocity_roll = np.zeros((num_frames, NUM_KEYS), np.float32)
  # Two onsets of one key on one frame: the louder one is the target.
  np.maximum.at(velocity_roll, (first[has_onset], keys[has_onset]),
                velocity[has_onset].astype(np.float32) / 128.0)
  # Per key, the last frame of a note that began before the crop (-1: none).
  hidden_until = np.full(NUM_KEYS, -1, np.int64)
  np.maximum.at(hidden_until, keys[~has_onset], clipped_last[~has_onset])
  return {
      "frame": _spans(np.maximum(first, 0), clipped_last, keys, num_frames),
      "onset": _triangles(t_on[has_onset], keys[has_onset], num_frames, fps),
      "offset": _triangles(t_off[has_offset], keys[has_offset], num_frames, fps),
      "velocity": velocity_roll,
      "onset_mask": onset_mask,
      "mask": (np.arange(num_frames)[:, None] > hidden_until[None, :]).astype(np.float32),
  }


_ONSET, _FRAME, _OFFSET = 3, 2, 1  # HPPNet's label codes


def hppnet_targets(notes: notes_lib.Notes, start: float, num_frames: int, fps: float) -> dict[str, np.ndarray]:
  """HPPNet's pretraining targets of the crop [start, start + num_frames / fps) (Wei et al.).

  Args:
    notes: the piece's notes (sustain-extended), in seconds.
    start: crop start in seconds.
    num_frames: frames in the crop (501 for 10 s at 50 fps).
    fps: frames per second.

  Returns:
    float32 [num_frames, 88] arrays "onset", "frame", "offset", "velocity"
    (see the module docstring).
  """
  _check_crop(num_frames, fps)
  label = np.zeros((num_frames, NUM_KEYS), np.uint8)
  velocity = np.zeros((num_frames, NUM_KEYS), np.float32)
  stop = np.searchsorted(notes.onset, start + num_frames / fps, side="right")
  on = np.rint((notes.onset[:stop] - start) * fps).astype(np.int64)
  off = np.minimum(np.rint((notes.offset[:stop] - start) * fps).astype(np.int64), num_frames)
  keys = notes.pitch[:stop].astype(np.int64) - MIN_PITCH
  # Sequential writes: a later note overwrites an earlier one's labels, as in HPPNet's loop.
  for first, last, key, vel in zip(on.tolist(), off.tolist(), keys.tolist(), notes.velocity[:stop].tolist()):
    if not 0 <= key < NUM_KEYS or last < 0 or first >= num_frames:
      continue
    lo = max(first, 0)
    if first >= 0:
      label[first, key] = _ONSET
    label[max(first + 1, 0):last, key] = _FRAME
    if last < num_frames:
      label[last, key] = _OFFSET
    velocity[lo:last, key] = vel / 128.0
  return {"onset": (label == _ONSET).astype(np.float32), "frame": (label >= _FRAME).astype(np.float32),
          "offset": (label == _OFFSET).astype(np.float32), "velocity": velocity}
