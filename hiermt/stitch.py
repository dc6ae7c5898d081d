"""Joining per-segment decoding results into the notes of a whole piece.

Hierarchical decoding keeps one table of the piece's notes, filled stage by
stage: stage 1 gives each segment's onsets and pitches, stage 2 a velocity per
note, stage 3 an offset per note. In stage 3 a segment lists first the notes
carried in from earlier segments (answered `note_sustain` there), sorted by
pitch, then its own notes by onset and pitch (`vocabulary.encode_segment`), so
which notes a segment lists depends on how the previous segment was decoded.

`chain_offsets` resolves that chain without decoding one segment at a time:
every segment is decoded at once with a guessed carried-in list (from the
encoder's frame roll), then each segment whose guess turned out different from
what its predecessor actually carried is decoded again with the actual list,
until nothing changes. Segment j's list is final after round j at the latest,
so the result is exactly that of the sequential chain, and with a good guess
it takes 1-2 rounds instead of one round per segment. A note carried over any
number of segments keeps its onset and ends where a segment gives it a time,
or with the audio.
"""

import dataclasses

import numpy as np

from hiermt import notes as notes_lib
from hiermt import vocabulary as vocab


@dataclasses.dataclass
class NoteTable:
  """Stage-1 notes of a piece, in sequence order (segment, onset, pitch).

  Attributes:
    segment: int64 [n], index of the 10 s segment holding the onset.
    onset: int64 [n], absolute onset step (10 ms).
    pitch: int64 [n], MIDI pitch.
  """
  segment: np.ndarray
  onset: np.ndarray
  pitch: np.ndarray

  @classmethod
  def from_onset_tokens(cls, token_arrays, first_segment: int = 0) -> "NoteTable":
    """The table of consecutive segments' stage-1 token sequences, segment `first_segment` first."""
    segment, onset, pitch = [], [], []
    for k, tokens in enumerate(token_arrays, start=first_segment):
      decoded = vocab.decode_segment(tokens, "onset_pitch")
      order = np.lexsort((decoded["pitch"], decoded["onset"]))
      segment.append(np.full(len(order), k))
      onset.append(k * vocab.SEGMENT_STEPS + decoded["onset"][order].astype(np.int64))
      pitch.append(decoded["pitch"][order].astype(np.int64))
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)  # noqa: E731
    return cls(cat(segment), cat(onset), cat(pitch))

  def __len__(self):
    return len(self.onset)

  def extend(self, other: "NoteTable") -> "NoteTable":
    """This table followed by the notes of later segments."""
    return NoteTable(*(np.concatenate([getattr(self, f), getattr(other, f)]) for f in ("segment", "onset", "pitch")))

  def inside(self, k: int) -> np.ndarray:
    """Ids of the notes with onsets in segment k, in sequence order."""
    return np.flatnonzero(self.segment == k)

  def sort_carried(self, ids) -> np.ndarray:
    """`ids` in the order a segment lists carried notes: by pitch, then onset."""
    ids = np.asarray(ids, np.int64)
    return ids[np.lexsort((self.onset[ids], self.pitch[ids]))]

  def tokens(self, ids, k: int, carried: int) -> tuple[np.ndarray, np.ndarray]:
    """(on, pitch) token ids of notes `ids` in segment k, the first `carried` of them carried in."""
    ids = np.asarray(ids, np.int64)
    on = vocab.time_id(self.onset[ids] - k * vocab.SEGMENT_STEPS)
    on[:carried] = vocab.NOTE_SUSTAIN
    return on.astype(np.int32), vocab.pitch_id(self.pitch[ids]).astype(np.int32)


def guess_carried(table: NoteTable, k: int, sounding_pitches) -> np.ndarray:
  """A guess of the notes carried into segment k: for each pitch still sounding at its start
  (from the encoder's frame roll), the latest earlier note of that pitch. Sorted for the sequence."""
  earlier = np.flatnonzero(table.segment < k)
  latest = {}
  for i in earlier:  # sequence order, so later notes overwrite earlier ones
    latest[int(table.pitch[i])] = i
  return table.sort_carried([latest[p] for p in sorted(set(np.asarray(sounding_pitches).tolist())) if p in latest])


@dataclasses.dataclass
class OffsetResult:
  """Stage-3 result for a run of segments.

  Attributes:
    offset: dict note id -> absolute offset step, for notes ended in these segments.
    carried_out: ids still sounding after the last segment (sorted for the sequence).
    rounds: decoding rounds the chain took.
    decoded_segments: segments decoded in all rounds (>= the number of segments).
  """
  offset: dict
  carried_out: np.ndarray
  rounds: int
  decoded_segments: int


def chain_offsets(table: NoteTable, segments, carried_in, guesses, decode_fn) -> OffsetResult:
  """Stage-3 answers for consecutive `segments`, exactly as the sequential chain gives them.

  Args:
    table: the piece's stage-1 notes (at least up to the last segment).
    segments: consecutive segment indices k0, k0+1, ...
    carried_in: note ids carried into segment k0 (exact, e.g. from the previous run).
    guesses: dict k -> guessed carried-in ids for the other segments.
    decode_fn: (list of (k, ids, num_carried)) -> list of answer token arrays, one
      per listed note; decodes the segments as one batch.

  Returns:
    An OffsetResult.
  """
  segments = list(segments)
  carried = {k: table.sort_carried(guesses.get(k, ())) for k in segments[1:]}
  carried[segments[0]] = table.sort_carried(carried_in)
  answers, todo, rounds, decoded = {}, segments, 0, 0
  while todo:
    rounds += 1
    decoded += len(todo)
    queries = [(k, np.concatenate([carried[k], table.inside(k)]), len(carried[k])) for k in todo]
    for (k, ids, _), result in zip(queries, decode_fn(queries)):
      answers[k] = (ids, np.asarray(result))
    todo = []
    for k in segments[1:]:
      ids, result = answers[k - 1]
      actual = table.sort_carried(ids[result == vocab.NOTE_SUSTAIN])
      if not np.array_equal(actual, carried[k]):
        carried[k] = actual
        todo.append(k)
  offset = {}
  for k in segments:
    ids, result = answers[k]
    timed = result != vocab.NOTE_SUSTAIN
    for i, step in zip(ids[timed].tolist(), vocab.id_to_step(result[timed]).tolist()):
      offset[i] = k * vocab.SEGMENT_STEPS + step
  ids, result = answers[segments[-1]]
  return OffsetResult(offset, table.sort_carried(ids[result == vocab.NOTE_SUSTAIN]), rounds, decoded)


def piece_notes(table: NoteTable, velocity, offset: dict, duration: float) -> notes_lib.Notes:
  """The piece's notes: stage-1 onsets and pitches, stage-2 velocities, stage-3 offsets.

  Notes without an offset (still sounding when the audio ends) end with the
  audio (`clip_to_duration`); a note ends at the latest where the next note of
  its key starts, and notes of one key 40 ms apart or less are one
  (`notes.one_note_per_key`).
  """
  if not len(table):
    return notes_lib.Notes.empty()
  end = int(np.ceil(duration * notes_lib.STEPS_PER_SECOND))
  off = np.array([offset.get(i, end) for i in range(len(table))], np.int64)  # [n]
  off = np.maximum(off, table.onset + 1)
  return clip_to_duration(notes_lib.one_note_per_key(notes_lib.from_steps(table.onset, off, table.pitch, velocity)),
                          duration)


def clip_to_duration(notes: notes_lib.Notes, duration: float) -> notes_lib.Notes:
  """Notes within the audio: onsets in the zero padding after it are dropped, offsets end with it
  (a note keeps at least 10 ms)."""
  keep = notes.onset < duration
  onset = notes.onset[keep]
  offset = np.maximum(np.minimum(notes.offset[keep], duration), onset + 1 / notes_lib.STEPS_PER_SECOND)
  return notes_lib.Notes.create(onset, offset, notes.pitch[keep], notes.velocity[keep])
