"""The 1265-id note codec: each stage's token layout per 10 s segment, both ways.

Ids (design.md §1): 0 pad, 1 sos, 2 eos, 3 unk, 4 note_sustain, 5-7 task
tokens, 8-1008 time (8 + step, 10 ms steps 0..1000 from the segment start),
1009-1136 pitch 0..127, 1137-1264 velocity 0..127.

A sequence is `<sos> <task> group* <eos>` with one group per note:

  onset_pitch  t_on pitch             notes whose onset step is in [0, 1000)
  velocity     t_on pitch vel         the same notes
  offset       on pitch off           every note sounding in the segment
  flatten      on pitch off vel       every note sounding in the segment

In `offset` and `flatten`, `on` is `note_sustain` for a note that started
before the segment and `off` is `note_sustain` for one that ends after it
(offset step > 1000). Notes carried in from earlier segments come first,
sorted by pitch (then onset); the others follow sorted by onset, then pitch.
Times are quantised once on the absolute grid (`notes.to_steps`), so a note
onset falls into exactly one segment of a piece and a note ending exactly on
a boundary ends with time 1000 in the earlier segment.

There are three task ids only: the paper fixes the vocabulary at 1265 ids,
which leaves room for the three hierarchical stages; the `flatten` baseline is
a separate model and reuses the onset_pitch task id (5).
"""

import collections

import numpy as np

from hiermt import notes as notes_lib

VOCAB_SIZE = 1265
PAD, SOS, EOS, UNK, NOTE_SUSTAIN = 0, 1, 2, 3, 4
TASK_IDS = {"onset_pitch": 5, "velocity": 6, "offset": 7, "flatten": 5}
STAGES = ("onset_pitch", "velocity", "offset", "flatten")

SEGMENT_SECONDS = 10.0
SEGMENT_STEPS = round(SEGMENT_SECONDS * notes_lib.STEPS_PER_SECOND)  # 1000
TIME_OFFSET, NUM_TIMES = 8, SEGMENT_STEPS + 1
PITCH_OFFSET, NUM_PITCHES = TIME_OFFSET + NUM_TIMES, 128
VELOCITY_OFFSET, NUM_VELOCITIES = PITCH_OFFSET + NUM_PITCHES, 128
assert VELOCITY_OFFSET + NUM_VELOCITIES == VOCAB_SIZE

# Decoded onset/offset step standing for `note_sustain`.
SUSTAIN_STEP = -1
# What decoding fills in for fields a stage does not predict (as the official inference does).
PLACEHOLDER_DURATION_STEPS = 10
PLACEHOLDER_VELOCITY = 100

# Token kinds of one note group, per stage. "time|sustain" also admits note_sustain.
LAYOUTS = {
    "onset_pitch": ("time", "pitch"),
    "velocity": ("time", "pitch", "velocity"),
    "offset": ("time|sustain", "pitch", "time|sustain"),
    "flatten": ("time|sustain", "pitch", "time|sustain", "velocity"),
}
# Which group slots are prediction targets (loss mask); <eos> always is.
_TARGET_SLOTS = {
    "onset_pitch": (True, True),
    "velocity": (False, False, True),
    "offset": (False, False, True),
    "flatten": (True, True, True, True),
}
# Field stored in each group slot.
FIELDS = {
    "onset_pitch": ("onset", "pitch"),
    "velocity": ("onset", "pitch", "velocity"),
    "offset": ("onset", "pitch", "offset"),
    "flatten": ("onset", "pitch", "offset", "velocity"),
}


def _check_stage(stage):
  if stage not in LAYOUTS:
    raise ValueError(f"unknown stage {stage!r}; valid stages: {', '.join(STAGES)}")


def time_id(step):
  """Token id(s) of segment-relative time step(s) 0..1000."""
  return TIME_OFFSET + np.asarray(step)


def pitch_id(pitch):
  """Token id(s) of MIDI pitch(es) 0..127."""
  return PITCH_OFFSET + np.asarray(pitch)


def velocity_id(velocity):
  """Token id(s) of MIDI velocity(ies) 0..127."""
  return VELOCITY_OFFSET + np.asarray(velocity)


def id_to_step(ids):
  """Time step(s) of time token id(s)."""
  return np.asarray(ids) - TIME_OFFSET


def id_to_pitch(ids):
  """MIDI pitch(es) of pitch token id(s)."""
  return np.asarray(ids) - PITCH_OFFSET


def id_to_velocity(ids):
  """MIDI velocity(ies) of velocity token id(s)."""
  return np.asarray(ids) - VELOCITY_OFFSET


def _kind_mask(kind):
  """bool [VOCAB_SIZE]: the ids of one slot kind."""
  mask = np.zeros(VOCAB_SIZE, bool)
  ranges = {"time": (TIME_OFFSET, NUM_TIMES), "pitch": (PITCH_OFFSET, NUM_PITCHES),
            "velocity": (VELOCITY_OFFSET, NUM_VELOCITIES)}
  for part in kind.split("|"):
    if part == "sustain":
      mask[NOTE_SUSTAIN] = True
    else:
      first, count = ranges[part]
      mask[first:first + count] = True
  return mask


def slot_masks(stage: str) -> np.ndarray:
  """The note-group grammar of `stage`.

  Returns:
    bool [group_length, VOCAB_SIZE]: row j marks the ids allowed in slot j of a note group.
  """
  _check_stage(stage)
  return np.stack([_kind_mask(kind) for kind in LAYOUTS[stage]])


_SLOT_MASKS = {stage: slot_masks(stage) for stage in STAGES}


def encode_segment(notes: notes_lib.Notes, start: float, stage: str) -> tuple[np.ndarray, np.ndarray]:
  """Tokens and loss mask of the 10 s segment of `notes` starting at `start` seconds.

  Args:
    notes: the notes of a whole piece (or any superset of the segment's notes).
    start: segment start in seconds, a multiple of 0.01 (may be negative or past the end).
    stage: one of STAGES.

  Returns:
    tokens: int32 [L], `<sos> <task> group* <eos>`.
    mask: bool [L], True where the token is a prediction target.
  """
  _check_stage(stage)
  s0 = round(start * notes_lib.STEPS_PER_SECOND)
  if abs(start * notes_lib.STEPS_PER_SECOND - s0) > 1e-6:
    raise ValueError(f"segment start {start} s is not on the 10 ms grid; round it to a multiple of 0.01")
  s1 = s0 + SEGMENT_STEPS
  onset, offset = notes_lib.to_steps(notes)  # [n_piece] each
  # Onset steps are sorted, so the notes starting in the segment are one slice.
  lo, hi = np.searchsorted(onset, [s0, s1], side="left")
  inside = np.arange(lo, hi)
  if stage in ("offset", "flatten"):
    carried = np.flatnonzero(offset[:lo] > s0)
  else:
    carried = np.zeros(0, np.int64)
  # Canonical order (see module docstring); ties broken by offset, then velocity.
  carried = carried[np.lexsort((notes.velocity[carried], offset[carried], onset[carried],
                                notes.pitch[carried]))]
  inside = inside[np.lexsort((notes.velocity[inside], offset[inside], notes.pitch[inside],
                              onset[inside]))]
  idx = np.concatenate([carried, inside])  # [n]

  on = np.where(onset[idx] < s0, NOTE_SUSTAIN, time_id(onset[idx] - s0))
  off = np.where(offset[idx] > s1, NOTE_SUSTAIN, time_id(np.minimum(offset[idx], s1) - s0))
  columns = {"onset": on, "pitch": pitch_id(notes.pitch[idx]), "offset": off,
             "velocity": velocity_id(notes.velocity[idx])}
  groups = np.stack([columns[f] for f in FIELDS[stage]], axis=1)  # [n, group_length]
  tokens = np.concatenate([[SOS, TASK_IDS[stage]], groups.ravel(), [EOS]]).astype(np.int32)
  mask = np.concatenate([[False, False], np.tile(_TARGET_SLOTS[stage], len(idx)), [True]])
  return tokens, mask


def num_segments(notes: notes_lib.Notes) -> int:
  """Number of 10 s segments covering the (quantised) piece, at least 1."""
  if not len(notes):
    return 1
  _, offset = notes_lib.to_steps(notes)
  return max(1, -(-int(offset.max()) // SEGMENT_STEPS))


def encode_piece(notes: notes_lib.Notes, stage: str) -> list[np.ndarray]:
  """Token arrays of consecutive 10 s segments (starts 0, 10, 20, ... s) covering the piece."""
  return [encode_segment(notes, k * SEGMENT_SECONDS, stage)[0] for k in range(num_segments(notes))]


def pad(tokens: np.ndarray, mask: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, bool]:
  """Pads with PAD (mask False) or truncates to `length`.

  Returns:
    (tokens int32 [length], mask bool [length], truncated): truncation keeps the
    first `length` tokens (and may drop <eos>); callers count truncations.
  """
  if len(tokens) != len(mask):
    raise ValueError(f"tokens and mask differ in length: {len(tokens)} vs {len(mask)}")
  out_tokens = np.full(length, PAD, np.int32)
  out_mask = np.zeros(length, bool)
  n = min(length, len(tokens))
  out_tokens[:n], out_mask[:n] = tokens[:n], mask[:n]
  return out_tokens, out_mask, len(tokens) > length


def decode_segment(tokens, stage: str) -> dict[str, np.ndarray]:
  """Note groups of one segment's tokens, tolerating malformed model output.

  Reading stops at the first <eos>. A token that fits the next slot of the
  current group fills it; one that does not but can open a group (a time, or
  note_sustain where allowed) abandons the incomplete group and opens a new
  one; anything else (pad, sos, task, unk, a token of the wrong kind) is
  skipped. Groups whose offset is not after their onset are dropped.

  Returns:
    int32 [n] arrays keyed by the stage's fields ("onset", "pitch", and
    "velocity" and/or "offset"); onset/offset are segment-relative steps,
    SUSTAIN_STEP for note_sustain.
  """
  _check_stage(stage)
  allowed = _SLOT_MASKS[stage]
  length = allowed.shape[0]
  groups, current = [], []
  for token in np.asarray(tokens).tolist():
    if token == EOS:
      break
    if not 0 <= token < VOCAB_SIZE:
      continue
    if allowed[len(current), token]:
      current.append(token)
    elif allowed[0, token]:
      current = [token]
    if len(current) == length:
      groups.append(current)
      current = []
  groups = np.asarray(groups, np.int64).reshape(-1, length)  # [n, group_length]
  out = {}
  for j, field in enumerate(FIELDS[stage]):
    column = groups[:, j]
    if field in ("onset", "offset"):
      out[field] = np.where(column == NOTE_SUSTAIN, SUSTAIN_STEP, id_to_step(column))
    elif field == "pitch":
      out[field] = id_to_pitch(column)
    else:
      out[field] = id_to_velocity(column)
  if "offset" in out:
    valid = ((out["onset"] == SUSTAIN_STEP) | (out["offset"] == SUSTAIN_STEP) |
             (out["offset"] > out["onset"]))
    out = {k: v[valid] for k, v in out.items()}
  return {k: v.astype(np.int32) for k, v in out.items()}


def decode_piece(token_arrays, stage: str) -> notes_lib.Notes:
  """Notes of a piece from the token arrays of its consecutive 10 s segments.

  `onset_pitch` and `velocity` give each note a placeholder length of
  PLACEHOLDER_DURATION_STEPS (0.1 s); `onset_pitch` and `offset` give it
  PLACEHOLDER_VELOCITY. For `offset` and `flatten`, a note_sustain onset
  continues the earliest open note of that pitch from the previous segment
  (a continuation with no open note is dropped); an open note the segment
  does not continue ends at the segment start; notes open after the last
  segment end with the piece (number of segments x 10 s).
  """
  _check_stage(stage)
  decoded = [decode_segment(t, stage) for t in token_arrays]
  on_steps, off_steps, pitches, velocities = [], [], [], []

  def emit(onset, offset, pitch, velocity):
    on_steps.append(onset)
    off_steps.append(offset)
    pitches.append(pitch)
    velocities.append(velocity)

  if stage in ("onset_pitch", "velocity"):
    for k, seg in enumerate(decoded):
      onset = k * SEGMENT_STEPS + seg["onset"].astype(np.int64)
      velocity = seg.get("velocity", np.full(len(onset), PLACEHOLDER_VELOCITY))
      emit(onset, onset + PLACEHOLDER_DURATION_STEPS, seg["pitch"], velocity)
  else:
    # pitch -> [(absolute onset step, velocity)] of notes sounding past the segment end,
    # oldest first, matching the order in which the next segment lists them.
    open_notes = collections.defaultdict(list)
    for k, seg in enumerate(decoded):
      s0 = k * SEGMENT_STEPS
      carried, open_notes = open_notes, collections.defaultdict(list)
      velocity = seg.get("velocity", np.full(len(seg["pitch"]), PLACEHOLDER_VELOCITY))
      for on, pitch, off, vel in zip(seg["onset"].tolist(), seg["pitch"].tolist(),
                                     seg["offset"].tolist(), velocity.tolist()):
        if on == SUSTAIN_STEP:
          if not carried[pitch]:
            continue
          onset, vel = carried[pitch].pop(0)
        else:
          onset = s0 + on
        if off == SUSTAIN_STEP:
          open_notes[pitch].append((onset, vel))
        elif s0 + off > onset:
          emit([onset], [s0 + off], [pitch], [vel])
      for pitch, held in carried.items():
        for onset, vel in held:
          emit([onset], [max(s0, onset + 1)], [pitch], [vel])
    end = len(decoded) * SEGMENT_STEPS
    for pitch, held in open_notes.items():
      for onset, vel in held:
        emit([onset], [max(end, onset + 1)], [pitch], [vel])
  if not on_steps:
    return notes_lib.Notes.empty()
  return notes_lib.from_steps(np.concatenate(on_steps), np.concatenate(off_steps),
                              np.concatenate(pitches), np.concatenate(velocities))
