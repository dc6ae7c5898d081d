"""Note arrays, MIDI read/write with sustain-pedal extension, and the 10 ms grid.

A piece is a `Notes`: four parallel arrays (onset and offset in seconds, MIDI
pitch, velocity), sorted by onset, then pitch. `read_midi` merges every
non-drum instrument and extends notes by the sustain pedal exactly as
`note_seq.sequences_lib.apply_sustain_control_changes` does, because the
sustain-extended notes are both the training targets and the evaluation
reference (design.md §1). Everything that snaps times to the token grid
(`to_steps`, `quantize`) lives here so the codec, the targets and the metrics
share one definition.
"""

import dataclasses
import io
import pathlib

from absl import logging
import numpy as np
import pretty_midi

from hiermt import atomic_file

# Token time resolution: 10 ms steps.
STEPS_PER_SECOND = 100
# Decoded notes of one key this close are one stroke (`one_note_per_key`): a key is not struck
# twice within 40 ms, the note reader's `WRITTEN_FRAMES` too.
SAME_STROKE_SECONDS = 0.04
SUSTAIN_CONTROL = 64
# note_seq's event order at equal times: pedal down, pedal up, note on, note off.
_PEDAL_DOWN, _PEDAL_UP, _NOTE_ON, _NOTE_OFF = 0, 1, 2, 3


class MidiError(ValueError):
  """A MIDI file could not be parsed."""


@dataclasses.dataclass(frozen=True, eq=False)
class Notes:
  """Notes of a piece, sorted by onset, then pitch (then offset, velocity).

  Attributes:
    onset: float64 [n], seconds, >= 0.
    offset: float64 [n], seconds, > onset.
    pitch: int32 [n], MIDI pitch 0..127.
    velocity: int32 [n], MIDI velocity 0..127.

  The arrays are read-only. Build from unsorted data with `Notes.create`.
  """

  onset: np.ndarray
  offset: np.ndarray
  pitch: np.ndarray
  velocity: np.ndarray

  def __post_init__(self):
    fields = {
        "onset": np.array(self.onset, dtype=np.float64),
        "offset": np.array(self.offset, dtype=np.float64),
        "pitch": np.array(self.pitch, dtype=np.int32),
        "velocity": np.array(self.velocity, dtype=np.int32),
    }
    shapes = {name: a.shape for name, a in fields.items()}
    if any(a.ndim != 1 for a in fields.values()) or len(set(shapes.values())) != 1:
      raise ValueError(f"Notes fields must be 1-D arrays of one length, got shapes {shapes}")
    for name, a in fields.items():
      a.setflags(write=False)
      object.__setattr__(self, name, a)
    _check_values(self.onset, self.offset, self.pitch, self.velocity)
    order_ok = (np.diff(self.onset) > 0) | ((np.diff(self.onset) == 0) & (np.diff(self.pitch) >= 0))
    if not np.all(order_ok):
      i = int(np.argmin(order_ok)) + 1
      raise ValueError(f"note {i} is out of order (notes must be sorted by onset, then pitch); "
                       "build unsorted notes with Notes.create")

  def __len__(self):
    return len(self.onset)

  @classmethod
  def create(cls, onset, offset, pitch, velocity) -> "Notes":
    """Builds Notes from unsorted arrays, sorting by onset, pitch, offset, velocity."""
    onset, offset = np.asarray(onset, np.float64), np.asarray(offset, np.float64)
    pitch, velocity = np.asarray(pitch), np.asarray(velocity)
    _check_values(onset, offset, pitch, velocity)  # before the int32 cast can wrap values
    order = np.lexsort((velocity, offset, pitch, onset))
    return cls(onset[order], offset[order], pitch[order], velocity[order])

  @classmethod
  def empty(cls) -> "Notes":
    """A piece without notes."""
    return cls(np.zeros(0), np.zeros(0), np.zeros(0, np.int32), np.zeros(0, np.int32))


def one_note_per_key(notes: Notes) -> Notes:
  """`notes` with at most one note sounding on each key at a time.

  Notes of one key starting within `SAME_STROKE_SECONDS` of the one before
  are one stroke: the first is kept, with its velocity, and lasts as long as
  the longest of them. Then a note ends no later than the next onset of its
  key. A piano key struck again ends the note it was sounding (the references
  obey this: `read_midi`'s pedal rule cuts a held note at a re-strike), and a
  MIDI file cannot hold two overlapping notes of one key: a reader pairs the
  first note-off with either note-on. The decoders describe each note by
  itself (the offset stage never sees a key's next onset, which comes later
  in its sequence, and onset_pitch can write a key again a step or two
  later), so their notes can overlap; this is where they stop doing so.
  """
  by_key = np.lexsort((notes.onset, notes.pitch))  # [n] by pitch, then onset; stable for ties
  pitch, onset, offset = notes.pitch[by_key], notes.onset[by_key], notes.offset[by_key]
  first = np.ones(len(by_key), bool)
  # A gap of exactly SAME_STROKE_SECONDS (4 grid steps) counts as one stroke, whatever the float rounding.
  first[1:] = (pitch[1:] != pitch[:-1]) | (np.diff(onset) > SAME_STROKE_SECONDS + 1e-9)
  stroke = np.cumsum(first) - 1  # [n] index of each note's stroke
  end = np.full(np.count_nonzero(first), -np.inf)
  np.maximum.at(end, stroke, offset)  # [strokes] the longest note of each stroke
  pitch, onset = pitch[first], onset[first]
  next_onset = np.full(len(onset), np.inf)  # [strokes], the next onset of the same key
  same_key = pitch[1:] == pitch[:-1]
  next_onset[:-1][same_key] = onset[1:][same_key]
  return Notes.create(onset, np.minimum(end, next_onset), pitch, notes.velocity[by_key][first])


def _check_values(onset, offset, pitch, velocity):
  """Raises ValueError naming the first note with an invalid value."""
  if onset.shape != offset.shape or onset.shape != pitch.shape or onset.shape != velocity.shape:
    raise ValueError(f"Notes fields must have one length, got {onset.shape}, {offset.shape}, "
                     f"{pitch.shape}, {velocity.shape}")
  checks = (
      (~np.isfinite(onset) | (onset < 0), "onset", onset, "must be finite and >= 0"),
      (~np.isfinite(offset), "offset", offset, "must be finite"),
      (offset <= onset, "offset", offset, "must be greater than the onset"),
      ((pitch < 0) | (pitch > 127), "pitch", pitch, "is outside the MIDI range 0..127"),
      ((velocity < 0) | (velocity > 127), "velocity", velocity, "is outside the MIDI range 0..127"),
  )
  for bad, name, values, what in checks:
    if np.any(bad):
      i = int(np.argmax(bad))
      raise ValueError(f"note {i}: {name} {values[i]} {what} (onset {onset[i]}, offset {offset[i]})")


def to_steps(notes: Notes) -> tuple[np.ndarray, np.ndarray]:
  """Onset and offset as integer 10 ms steps from time 0.

  Times round to the nearest step; a note whose offset rounds onto its onset
  step keeps one step of length, so quantised notes stay valid notes.

  Returns:
    (onset_steps, offset_steps), int64 [n] each, offset_steps > onset_steps;
    onset_steps is non-decreasing because the notes are sorted by onset.
  """
  onset = np.rint(notes.onset * STEPS_PER_SECOND).astype(np.int64)
  offset = np.maximum(np.rint(notes.offset * STEPS_PER_SECOND).astype(np.int64), onset + 1)
  return onset, offset


def from_steps(onset_steps, offset_steps, pitch, velocity) -> Notes:
  """Notes from integer 10 ms steps (times are exactly step / 100)."""
  return Notes.create(np.asarray(onset_steps) / STEPS_PER_SECOND,
                      np.asarray(offset_steps) / STEPS_PER_SECOND, pitch, velocity)


def quantize(notes: Notes) -> Notes:
  """`notes` snapped to the 10 ms token grid (see `to_steps`)."""
  onset, offset = to_steps(notes)
  return from_steps(onset, offset, notes.pitch, notes.velocity)


def _extend_by_sustain(onset, offset, pitch, group, pedal_time, pedal_value, pedal_group):
  """Sustain-pedal extension with the exact semantics of note_seq.

  Events are processed in time order (at equal times: pedal down, pedal up,
  note on, note off; otherwise notes before pedals, each in input order), a
  pedal acting only on the notes of its own `group` (instrument). While the
  pedal is down, a released note keeps sounding until the pedal goes up or
  the same pitch is struck again; a re-strike under the pedal also cuts a
  still-held note of that pitch, and a note cut at its own onset is deleted.
  Notes still sounding after the last event end at the time of that event.

  Args:
    onset, offset: float64 [n] note times.
    pitch, group: int [n].
    pedal_time: float64 [m] times of sustain control changes.
    pedal_value: int [m] their values (>= 64 is down).
    pedal_group: int [m] the group each pedal event belongs to.

  Returns:
    (new_offset float64 [n], kept bool [n]): extended offsets, and False for
    notes deleted by a re-strike at their own onset.
  """
  n, m = len(onset), len(pedal_time)
  times = np.concatenate([onset, offset, pedal_time])  # [2n + m]
  kinds = np.concatenate([np.full(n, _NOTE_ON), np.full(n, _NOTE_OFF),
                          np.where(pedal_value >= SUSTAIN_CONTROL, _PEDAL_DOWN, _PEDAL_UP)])
  index = np.concatenate([np.arange(n), np.arange(n), np.arange(m)])
  order = np.lexsort((kinds, times))  # stable: ties keep the concatenation order

  new_offset = offset.copy()
  kept = np.ones(n, bool)
  pedal_down = {}  # group -> bool
  sounding = {}  # group -> {pitch: note indices in the order they started}
  events = zip(kinds[order].tolist(), index[order].tolist(), times[order].tolist())
  for kind, i, t in events:
    if kind == _PEDAL_DOWN:
      pedal_down[pedal_group[i]] = True
    elif kind == _PEDAL_UP:
      g = pedal_group[i]
      pedal_down[g] = False
      # Keys released before now were held by the pedal and end here; keys still down stay.
      by_pitch = {}
      for p, held in sounding.get(g, {}).items():
        for j in held:
          if offset[j] < t:
            new_offset[j] = t
        if still_down := [j for j in held if offset[j] >= t]:
          by_pitch[p] = still_down
      sounding[g] = by_pitch
    elif kind == _NOTE_ON:
      held = sounding.setdefault(group[i], {}).setdefault(pitch[i], [])
      if pedal_down.get(group[i], False):
        for j in held:
          new_offset[j] = t
          kept[j] = onset[j] != t
        held.clear()
      held.append(i)
    elif not pedal_down.get(group[i], False):  # note off without pedal
      held = sounding.get(group[i], {}).get(pitch[i], [])
      if i in held:  # a re-strike under the pedal may have ended it already
        held.remove(i)
  last_time = times[order[-1]] if len(order) else 0.0
  for by_pitch in sounding.values():
    for held in by_pitch.values():
      new_offset[held] = last_time
  return new_offset, kept


def from_pretty_midi(midi: pretty_midi.PrettyMIDI, name: str = "<midi>") -> Notes:
  """Sustain-extended notes of all non-drum instruments of `midi`.

  Args:
    midi: a parsed MIDI file.
    name: names the source in log messages.

  Returns:
    Notes. Notes of zero or negative length in `midi` are dropped (and counted
    in the log); otherwise the result equals note_seq's sustain-extended notes.
  """
  onset, offset, pitch, velocity, group = [], [], [], [], []
  pedal_time, pedal_value, pedal_group = [], [], []
  for g, inst in enumerate(midi.instruments):
    # Drum pedals act on no note but still count for the last event time, as in note_seq.
    for cc in inst.control_changes:
      if cc.number == SUSTAIN_CONTROL:
        pedal_time.append(cc.time)
        pedal_value.append(cc.value)
        pedal_group.append(g)
    if inst.is_drum:
      continue
    for note in inst.notes:
      onset.append(note.start)
      offset.append(note.end)
      pitch.append(note.pitch)
      velocity.append(note.velocity)
      group.append(g)
  onset, offset = np.asarray(onset, np.float64), np.asarray(offset, np.float64)
  pitch, velocity, group = (np.asarray(a, np.int64) for a in (pitch, velocity, group))
  # A key released no later than it was struck is corrupt data, not a note: drop it before
  # the pedal could stretch it into one.
  valid = offset > onset
  if not np.all(valid):
    logging.warning("%s: dropped %d notes of zero or negative length", name, int(np.sum(~valid)))
    onset, offset, pitch, velocity, group = (a[valid] for a in (onset, offset, pitch, velocity, group))
  new_offset, kept = _extend_by_sustain(
      onset, offset, pitch.tolist(), group.tolist(), np.asarray(pedal_time, np.float64),
      np.asarray(pedal_value, np.int64), pedal_group)
  return Notes.create(onset[kept], new_offset[kept], pitch[kept], velocity[kept])


def read_midi(path) -> Notes:
  """Reads a MIDI file into sustain-extended Notes (all non-drum instruments merged).

  Raises:
    FileNotFoundError: `path` does not exist.
    MidiError: the file is not a readable Standard MIDI File.
  """
  data = pathlib.Path(path).read_bytes()
  try:
    midi = pretty_midi.PrettyMIDI(io.BytesIO(data))
  except Exception as e:  # pretty_midi/mido raise many exception types on bad files
    raise MidiError(f"{path}: not a readable MIDI file ({type(e).__name__}: {e})") from e
  return from_pretty_midi(midi, str(path))


def write_midi(notes: Notes, path) -> None:
  """Writes `notes` as a one-track piano MIDI file (program 0), atomically.

  The file is written under a temporary name and then renamed, so a crash
  never leaves a half-written file at `path`. Times are
  stored with 0.5 ms ticks (120 bpm, 1000 ticks per beat), so 10 ms grid
  times survive a write/read round trip.
  """
  midi = pretty_midi.PrettyMIDI(resolution=1000, initial_tempo=120.0)
  piano = pretty_midi.Instrument(program=0, name="piano")
  piano.notes = [pretty_midi.Note(int(v), int(p), float(s), float(e))
                 for s, e, p, v in zip(notes.onset, notes.offset, notes.pitch, notes.velocity)]
  midi.instruments.append(piano)
  with atomic_file.atomic_output(path) as tmp:
    midi.write(tmp)
