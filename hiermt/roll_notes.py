"""Notes from an encoder's frame-level piano rolls: the "Roll" baseline.

Each encoder comes with the note extraction its authors published, and the
baseline is only fair if it decodes exactly as they did:

  crnn    Kong et al. (2021): `RegressionPostProcessor` of
          piano_transcription_inference 0.0.6 (utilities.py) with
          `note_detection_with_onset_offset_regress` (piano_vad.py). Onsets
          and offsets are peaks of the regression rolls, placed between frames
          by interpolating the peak; a note ends at an offset peak or where the
          frame roll falls to the threshold, at the next onset of its pitch, or
          after 600 frames. Pedals are not decoded.
  hppnet  Wei et al. (2022): `extract_notes` of HPPNet (hppnet/decoding.py),
          the Onsets and Frames rule with onset peak picking, and the velocity
          scaling of its `save_midi` (hppnet/midi.py). One change by default
          (`cut_at_onset`): a new onset of a key ends the note sounding on it,
          as Kong's rule and Magenta's Onsets and Frames do; HPPNet's code lets
          the note run on through the new one while the frame roll stays on.

Both are vectorised over frames and pitches but give the reference's notes on
the same rolls, rounding included, except where its note would be invalid as
`Notes`: a note Kong's code makes empty or reversed gets one frame, velocities
are clipped to 1..127 (the references can emit 0, Kong's also 128), and a peak
with a flat top, where Kong's interpolation divides 0 by 0, sits on its frame
instead of at NaN.

Rolls are float [frames, 88] probabilities; column j is MIDI pitch 21 + j.
"""

import numpy as np

from hiermt import metrics as metrics_lib
from hiermt import notes as notes_lib
from hiermt import stitch
from hiermt.data import rolls as rolls_lib

ROLL_NAMES = ("onset", "offset", "frame", "velocity")
DEFAULT_THRESHOLDS = {
    # Kong's inference package (PianoTranscription in inference.py).
    "crnn": {"onset": 0.3, "offset": 0.3, "frame": 0.1},
    # HPPNet tests at 0.4 / 0.4 (evaluate.py's command-line defaults and train.py's test
    # thresholds); the 0.5 defaults of its evaluate() and extract_notes are only used for
    # validation during training.
    "hppnet": {"onset": 0.4, "frame": 0.4},
}
# Settings of an encoder's note rule besides its thresholds (`rolls_to_notes`).
DEFAULT_RULES = {"crnn": {}, "hppnet": {"cut_at_onset": True}}

# Kong: frames that must be monotonic on each side of an onset / offset peak.
_CRNN_ONSET_NEIGHBOUR = 2
_CRNN_OFFSET_NEIGHBOUR = 4
# Kong caps notes in frames, not seconds (6 s at his 100 fps).
_CRNN_MAX_FRAMES = 600
# Kong's config.velocity_scale: the velocity roll is trained on MIDI velocity / 128.
_CRNN_VELOCITY_SCALE = 128
_HPPNET_MAX_FRAMES = 1000
# HPPNet's save_midi writes int(velocity * 127), although its targets are velocity / 128.
_HPPNET_VELOCITY_SCALE = 127


def _check_rolls(rolls):
  """The four rolls as float arrays [frames, 88]; raises ValueError on bad input."""
  missing = [name for name in ROLL_NAMES if name not in rolls]
  if missing:
    raise ValueError(f"rolls lack {missing}; need {', '.join(ROLL_NAMES)}")
  arrays = []
  for name in ROLL_NAMES:
    roll = np.asarray(rolls[name])
    # float32 rolls stay float32, so thresholds and peak shifts round as in the references.
    if roll.dtype not in (np.float32, np.float64):
      roll = roll.astype(np.float64)
    if roll.ndim != 2 or roll.shape[1] != rolls_lib.NUM_KEYS:
      raise ValueError(f"roll {name!r} must have shape [frames, {rolls_lib.NUM_KEYS}], got {roll.shape}")
    if not np.all(np.isfinite(roll)):
      raise ValueError(f"roll {name!r} has non-finite values")
    arrays.append(roll)
  shapes = {name: roll.shape for name, roll in zip(ROLL_NAMES, arrays)}
  if len(set(shapes.values())) != 1:
    raise ValueError(f"rolls must have the same number of frames, got shapes {shapes}")
  return arrays


def _check_fps(frames_per_second):
  if not frames_per_second > 0:
    raise ValueError(f"frames_per_second must be positive, got {frames_per_second}")


def _next_index(mask):
  """int64 [frames + 1, 88]: at row t, the first frame >= t where `mask` is set, else frames.

  The extra last row lets callers look one frame past the end.
  """
  frames = mask.shape[0]
  index = np.where(mask, np.arange(frames)[:, None], frames)  # [frames, 88]
  index = np.minimum.accumulate(index[::-1], axis=0)[::-1]
  return np.concatenate([index, np.full((1, mask.shape[1]), frames)])


def _regression_peaks(reg, threshold, neighbour):
  """Kong's `get_binarized_output_from_regression`: peaks of a regression roll.

  A frame n in [neighbour, frames - neighbour) is a peak when reg[n] > threshold
  and reg does not rise over the `neighbour` frames before n nor over those
  after it (so every frame of a plateau can be a peak). Its shift, in frames
  within [-0.5, 0.5], is where two lines of opposite slope cross: one through
  the peak and its lower neighbour, one through its other neighbour (Kong et
  al. 2021, Section III-D).

  Returns:
    (peak bool [frames, 88], shift [frames, 88] in reg's dtype, 0 off peaks).
  """
  frames = reg.shape[0]
  peak = np.zeros(reg.shape, bool)
  shift = np.zeros_like(reg)
  if frames <= 2 * neighbour:
    return peak, shift

  def at(k):  # reg[n + k] for every candidate n: [frames - 2 * neighbour, 88]
    return reg[neighbour + k:frames - neighbour + k]

  candidate = at(0) > threshold
  for i in range(neighbour):
    candidate &= (at(-i) >= at(-i - 1)) & (at(i) >= at(i + 1))
  before, centre, after = at(-1), at(0), at(1)
  with np.errstate(divide="ignore", invalid="ignore"):
    # The same float operations as Kong's, in the roll's dtype, so the shifts match bit for bit.
    crossing = (after - before) / (centre - np.minimum(before, after)) / 2
  peak[neighbour:frames - neighbour] = candidate
  # A flat top (before == centre == after) gives 0 / 0 in Kong's code: keep it on its frame.
  shift[neighbour:frames - neighbour] = np.where(candidate & np.isfinite(crossing), crossing, 0)
  return peak, shift


def crnn_notes(rolls, frames_per_second=100,
               onset_threshold=DEFAULT_THRESHOLDS["crnn"]["onset"],
               offset_threshold=DEFAULT_THRESHOLDS["crnn"]["offset"],
               frame_threshold=DEFAULT_THRESHOLDS["crnn"]["frame"]) -> notes_lib.Notes:
  """Notes from CRNN rolls, as Kong's `RegressionPostProcessor` extracts them.

  Every onset peak starts a note of its pitch, at (frame + shift) / fps. The
  note ends at whichever comes first:
    - the next onset peak of the pitch: at the frame before it, unshifted;
    - the first frame f after the onset with frame roll <= frame_threshold:
      at the first offset peak o in (onset, f] if o is nearer to f than to
      the onset frame ((o - onset) > (f - o)), else at f, plus the offset
      shift of that frame;
    - 600 frames after the onset, or the last frame: there, plus its offset
      shift.
  Ties go to the first rule listed. Times are rounded to float32 as Kong's
  post-processor returns them; a note that would end at or before its onset
  ends one frame after it. Velocity is int(velocity roll at the onset frame *
  128), clipped to 1..127.

  Args:
    rolls: dict with "onset" and "offset" (regression rolls), "frame" and
      "velocity": float [frames, 88]; other keys are ignored.
    frames_per_second: frame rate of the rolls (100 for Kong's CRNN).
    onset_threshold, offset_threshold: a regression peak must exceed these.
    frame_threshold: the frame roll at or below this ends a note.

  Returns:
    Notes; Notes.empty() if there are none.
  """
  onset, offset, frame, velocity = _check_rolls(rolls)
  _check_fps(frames_per_second)
  frames = onset.shape[0]
  onset_peak, onset_shift = _regression_peaks(onset, onset_threshold, _CRNN_ONSET_NEIGHBOUR)
  offset_peak, offset_shift = _regression_peaks(offset, offset_threshold, _CRNN_OFFSET_NEIGHBOUR)
  start, key = np.nonzero(onset_peak)  # [n] each
  if not len(start):
    return notes_lib.Notes.empty()

  # Candidate ends of each note, searched from the frame after its onset.
  next_onset = _next_index(onset_peak)[start + 1, key]  # [n]
  frame_gone = _next_index(frame <= frame_threshold)[start + 1, key]
  first_offset = _next_index(offset_peak)[start + 1, key]
  cap = np.minimum(start + _CRNN_MAX_FRAMES, frames - 1)

  by_onset = next_onset <= np.minimum(frame_gone, cap)
  by_frame = ~by_onset & (frame_gone <= cap)
  offset_first = (first_offset <= frame_gone) & (first_offset - start > frame_gone - first_offset)
  end = np.where(by_onset, next_onset - 1,
                 np.where(by_frame, np.where(offset_first, first_offset, frame_gone), cap))  # [n]
  # A note cut by the next onset gets no offset shift.
  end_shift = np.where(by_onset, 0.0, offset_shift[end, key].astype(np.float64))

  # Kong sums frame and shift in float64 and returns times as float32.
  onset_time = ((start + onset_shift[start, key].astype(np.float64)) / frames_per_second
                ).astype(np.float32).astype(np.float64)
  offset_time = ((end + end_shift) / frames_per_second).astype(np.float32).astype(np.float64)
  # Plateau onsets or a cut right after an onset can leave a note empty or reversed: give it a
  # frame. Valid notes, however short, stay as Kong makes them.
  offset_time = np.where(offset_time > onset_time, offset_time, onset_time + 1 / frames_per_second)
  # Kong: int(float32 velocity * 128); the product is exact, so floor is his truncation.
  scaled = np.floor(velocity[start, key].astype(np.float32) * np.float32(_CRNN_VELOCITY_SCALE))
  return notes_lib.Notes.create(onset_time, offset_time, key + rolls_lib.MIN_PITCH,
                                np.clip(scaled, 1, 127).astype(np.int32))


def hppnet_notes(rolls, frames_per_second=50,
                 onset_threshold=DEFAULT_THRESHOLDS["hppnet"]["onset"],
                 frame_threshold=DEFAULT_THRESHOLDS["hppnet"]["frame"],
                 cut_at_onset=DEFAULT_RULES["hppnet"]["cut_at_onset"]) -> notes_lib.Notes:
  """Notes from HPPNet rolls, as HPPNet's `extract_notes` and `save_midi` make them.

  Onset candidates are frames whose onset probability no neighbour exceeds
  (each frame of a plateau counts) and that exceed onset_threshold. Each run
  of consecutive candidates of a pitch starts one note at its first frame s.
  The note lasts while the frame roll stays above frame_threshold from frame
  s + 1 on (the frame roll at s itself is not looked at), at least one frame
  and at most 1000 frames; with `cut_at_onset`, also at most until the next
  note of its pitch starts. Its velocity is int(mean velocity roll over the
  run * 127), clipped to 1..127. Times are frame / fps. The offset roll is
  not used.

  Why `cut_at_onset`: a re-struck key's frame roll does not fall between the
  strokes when the strings ring on (the sustain pedal), so HPPNet's rule makes
  the first note last to the end of the last stroke, while the reference (and
  mir_eval's one-to-one matching) ends it where the next begins. On the
  generated test split, most notes whose offset missed by more than the
  tolerance ran through such a re-strike (docs/design.md).

  Args:
    rolls: dict with "onset", "offset", "frame", "velocity": float [frames, 88];
      other keys are ignored.
    frames_per_second: frame rate of the rolls (50 for HPPNet).
    onset_threshold, frame_threshold: probabilities must exceed these.
    cut_at_onset: end a note where the next note of its pitch starts; False
      gives HPPNet's published notes exactly.

  Returns:
    Notes; Notes.empty() if there are none (always for fewer than 2 frames,
    where HPPNet's peak picking finds no peaks).
  """
  onset, _, frame, velocity = _check_rolls(rolls)
  _check_fps(frames_per_second)
  frames = onset.shape[0]
  if frames < 2:
    return notes_lib.Notes.empty()
  peak = np.ones(onset.shape, bool)  # [frames, 88]
  peak[:-1] &= onset[:-1] >= onset[1:]
  peak[1:] &= onset[1:] >= onset[:-1]
  active = np.where(peak, onset, 0) > onset_threshold  # [frames, 88]
  first = active & ~np.concatenate([np.zeros((1, active.shape[1]), bool), active[:-1]])
  start, key = np.nonzero(first)  # [n] each
  if not len(start):
    return notes_lib.Notes.empty()

  # Frames held from s + 1 on; the sentinel row of _next_index makes it 0 for s = frames - 1.
  held = _next_index(frame <= frame_threshold)[start + 1, key] - (start + 1)  # [n]
  end = np.maximum(start + np.minimum(held, _HPPNET_MAX_FRAMES), start + 1)  # [n]
  if cut_at_onset:  # the next run of the key starts after s, so a note keeps at least one frame
    end = np.minimum(end, _next_index(first)[start + 1, key])
  run_end = _next_index(~active)[start, key]
  # Per-note means in float64, as numpy averages HPPNet's list of samples (runs are short).
  mean = np.array([velocity[s:e, k].astype(np.float64).mean() for s, e, k in zip(start, run_end, key)])
  scaled = np.trunc(mean * _HPPNET_VELOCITY_SCALE)
  # HPPNet multiplies frames by hop / sample rate, the same double as 1 / fps for its 50 fps.
  seconds_per_frame = 1 / frames_per_second
  return notes_lib.Notes.create(start * seconds_per_frame, end * seconds_per_frame,
                                key + rolls_lib.MIN_PITCH, np.clip(scaled, 1, 127).astype(np.int32))


_DECODERS = {"crnn": crnn_notes, "hppnet": hppnet_notes}


def rolls_to_notes(rolls, encoder: str, frames_per_second: float,
                   thresholds: dict | None = None) -> notes_lib.Notes:
  """Notes from the rolls of a whole piece, decoded as the encoder's authors do.

  Args:
    rolls: dict with "onset", "offset", "frame", "velocity": float
      [frames, 88] probabilities, column j being MIDI pitch 21 + j.
    encoder: "crnn" or "hppnet".
    frames_per_second: frame rate of the rolls (100 for crnn, 50 for hppnet).
    thresholds: overrides of DEFAULT_THRESHOLDS[encoder], e.g. {"onset": 0.5},
      and of the rule's other settings, DEFAULT_RULES[encoder] (the config's `roll`).

  Returns:
    Notes.

  Raises:
    ValueError: unknown encoder or setting name, or malformed rolls.
  """
  if encoder not in _DECODERS:
    raise ValueError(f"unknown encoder {encoder!r}; valid encoders: {', '.join(_DECODERS)}")
  merged = dict(DEFAULT_THRESHOLDS[encoder], **DEFAULT_RULES[encoder])
  unknown = sorted(set(thresholds or {}) - set(merged))
  if unknown:
    raise ValueError(f"unknown {encoder} roll settings {unknown}; valid keys: {', '.join(merged)}")
  merged.update(thresholds or {})
  return _DECODERS[encoder](rolls, frames_per_second,
                            **{name if name in DEFAULT_RULES[encoder] else f"{name}_threshold": value
                               for name, value in merged.items()})


def calibrated_key(name: str) -> str:
  """Name under which a checkpoint stores the calibrated threshold `name` (`calibrate`)."""
  return f"roll_{name}_threshold"


def stored_thresholds(metrics: dict | None, encoder: str) -> dict | None:
  """The calibrated thresholds saved with a checkpoint's score, or None when it has none."""
  keys = {name: calibrated_key(name) for name in DEFAULT_THRESHOLDS[encoder]}
  if not metrics or not all(key in metrics for key in keys.values()):
    return None
  return {name: float(metrics[key]) for name, key in keys.items()}


# Onset thresholds `calibrate` tries (probabilities; Kong's regression rolls are in [0, 1] too).
CALIBRATION_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))  # 0.05 ... 0.95


def calibrate(pieces, encoder: str, frames_per_second: float, start: dict | None = None):
  """The onset threshold that transcribes `pieces` best (On F1), and the metrics there.

  The published thresholds suit the published models; an encoder trained for a
  few hundred steps can put every onset probability below them and write no note
  at all. The onset threshold decides which notes exist, so it is chosen from
  `CALIBRATION_GRID` by On F1, the other thresholds held. A tie keeps the value
  nearest the one it starts from, so rolls that decide nothing keep it. The
  offset and frame thresholds are not tuned: chosen by On-Off F1 on a few
  validation pieces they overfit (docs/design.md).

  Args:
    pieces: (rolls, reference Notes, duration in seconds) per piece, the rolls as
      `rolls_to_notes` takes them.
    encoder: "crnn" or "hppnet".
    frames_per_second: frame rate of the rolls.
    start: thresholds to start from (default: DEFAULT_THRESHOLDS[encoder]); the
      rule's other settings in it (DEFAULT_RULES) are used and not returned.

  Returns:
    (thresholds, metrics): every threshold of the encoder, the onset one chosen,
    and `metrics.mean_metrics` of the pieces decoded with them.
  """
  if not pieces:
    raise ValueError("calibrate needs at least one piece")
  chosen = dict(DEFAULT_THRESHOLDS[encoder], **(start or {}))

  def score(onset):
    thresholds = dict(chosen, onset=onset)
    rows = [metrics_lib.note_metrics(reference, stitch.clip_to_duration(
        rolls_to_notes(rolls, encoder, frames_per_second, thresholds), duration))
        for rolls, reference, duration in pieces]
    return metrics_lib.mean_metrics(rows)

  current = chosen["onset"]
  best_value, best = current, score(current)
  others = [v for v in CALIBRATION_GRID if v != current]  # the start is scored above
  for value in sorted(others, key=lambda v: abs(v - current)):  # nearest first (the lower on equal distance)
    result = score(value)  # only a strictly higher On F1 moves it: ties keep the nearer value
    if result["onset_f1"] > best["onset_f1"]:
      best_value, best = value, result
  chosen["onset"] = best_value
  return {name: chosen[name] for name in DEFAULT_THRESHOLDS[encoder]}, best
