"""Tests for stitching segment results into a piece: note table, the offset chain, clipping."""

import numpy as np
import pytest

from hiermt import notes as notes_lib
from hiermt import stitch
from hiermt import vocabulary as vocab

T, P, V = vocab.time_id, vocab.pitch_id, vocab.velocity_id
S = vocab.NOTE_SUSTAIN


def _onset_tokens(*notes):
  """Stage-1 tokens of one segment from (step, pitch) pairs (in any order: the table sorts)."""
  body = [int(x) for step, pitch in notes for x in (T(step), P(pitch))]
  return np.array([vocab.SOS, vocab.TASK_IDS["onset_pitch"], *body, vocab.EOS], np.int32)


# Three segments. Note ids in sequence order:
#   segment 0: 0 = (100, 60), 1 = (100, 64), 2 = (900, 48)
#   segment 1: 3 = (50, 72)
#   segment 2: 4 = (10, 60)
TOKENS = [_onset_tokens((100, 64), (100, 60), (900, 48)), _onset_tokens((50, 72)), _onset_tokens((10, 60))]


def test_note_table_from_stage1_tokens():
  table = stitch.NoteTable.from_onset_tokens(TOKENS)
  np.testing.assert_array_equal(table.segment, [0, 0, 0, 1, 2])
  np.testing.assert_array_equal(table.onset, [100, 100, 900, 1050, 2010])
  np.testing.assert_array_equal(table.pitch, [60, 64, 48, 72, 60])
  np.testing.assert_array_equal(table.inside(0), [0, 1, 2])
  # Carried notes are listed by pitch, then onset.
  np.testing.assert_array_equal(table.sort_carried([3, 1, 2, 0]), [2, 0, 1, 3])
  on, pitch = table.tokens([2, 3], k=1, carried=1)
  np.testing.assert_array_equal(on, [S, T(50)])
  np.testing.assert_array_equal(pitch, [P(48), P(72)])
  later = stitch.NoteTable.from_onset_tokens(TOKENS[1:], first_segment=1)
  np.testing.assert_array_equal(later.onset, [1050, 2010])


# True offsets: note 2 (onset 900) sounds through segment 1 into segment 2 (two boundaries),
# note 1 crosses one boundary, note 0 ends inside segment 0, note 3 ends in segment 1, note 4
# sounds past the end of the audio.
TRUE_OFFSET = {0: 300, 1: 1200, 2: 2500, 3: 1500, 4: 10**9}


def _fake_decoder(table, calls):
  """Answers like a perfect model: time if the note ends in the segment, else note_sustain.

  A note listed as carried that the previous segment did not carry (a wrong guess) is
  answered with time 1, so a wrong carried list changes the result unless it is corrected.
  """

  def decode_fn(queries):
    calls.append([k for k, _, _ in queries])
    out = []
    for k, ids, carried in queries:
      answers = []
      for j, i in enumerate(ids):
        end = (k + 1) * vocab.SEGMENT_STEPS
        truly_carried = table.onset[i] < k * vocab.SEGMENT_STEPS < TRUE_OFFSET[i]
        if j < carried and not truly_carried:
          answers.append(T(1))
        elif TRUE_OFFSET[i] > end:
          answers.append(S)
        else:
          answers.append(T(TRUE_OFFSET[i] - k * vocab.SEGMENT_STEPS))
      out.append(np.array(answers, np.int32))
    return out

  return decode_fn


@pytest.mark.parametrize("guess", ["exact", "empty", "wrong"])
def test_chain_offsets_equals_the_sequential_chain(guess):
  table = stitch.NoteTable.from_onset_tokens(TOKENS)
  guesses = {"exact": {1: [1, 2], 2: [2]}, "empty": {}, "wrong": {1: [0], 2: [0, 3]}}[guess]
  calls = []
  result = stitch.chain_offsets(table, range(3), [], guesses, _fake_decoder(table, calls))
  assert result.offset == {0: 300, 1: 1200, 2: 2500, 3: 1500}
  np.testing.assert_array_equal(result.carried_out, [4])
  assert calls[0] == [0, 1, 2]  # the whole run is decoded as one batch first
  expected_rounds = {"exact": 1, "empty": 3, "wrong": 3}[guess]
  assert result.rounds == expected_rounds
  assert result.decoded_segments == sum(len(c) for c in calls)

  # One segment at a time, each with the exact list carried out of the one before.
  sequential, carried = {}, []
  for k in range(3):
    step = stitch.chain_offsets(table, [k], carried, {}, _fake_decoder(table, []))
    sequential.update(step.offset)
    carried = step.carried_out
  assert sequential == result.offset


def test_piece_notes_joins_stages_and_ends_open_notes_with_the_audio():
  table = stitch.NoteTable.from_onset_tokens(TOKENS)
  velocity = np.array([10, 20, 30, 40, 50])
  duration = 25.0
  notes = stitch.piece_notes(table, velocity, {0: 300, 1: 1200, 2: 2500, 3: 1500}, duration)
  rows = sorted(zip(notes.onset, notes.offset, notes.pitch, notes.velocity))
  np.testing.assert_allclose([r[:2] for r in rows], [(1.0, 3.0), (1.0, 12.0), (9.0, 25.0), (10.5, 15.0),
                                                      (20.1, 25.0)])
  assert [int(r[2]) for r in rows] == [60, 64, 48, 72, 60]
  assert [int(r[3]) for r in rows] == [10, 20, 30, 40, 50]


def test_piece_notes_end_a_note_where_its_key_is_struck_again():
  # Note 0 (key 60 at 1.0 s) was given an end past note 4 (key 60 again at 20.1 s): the stages
  # describe notes one by one, the piece keeps one sounding note per key.
  table = stitch.NoteTable.from_onset_tokens(TOKENS)
  notes = stitch.piece_notes(table, np.arange(5), {0: 2300, 1: 1200, 2: 2500, 3: 1500, 4: 2400}, 25.0)
  rows = sorted(zip(notes.onset.tolist(), notes.offset.tolist(), notes.pitch.tolist()))
  assert rows == [(1.0, 12.0, 64), (1.0, 20.1, 60), (9.0, 25.0, 48), (10.5, 15.0, 72), (20.1, 24.0, 60)]


def test_clip_to_duration_drops_padding_onsets_and_shortens_offsets():
  notes = notes_lib.Notes.create([1.0, 4.5, 5.2], [6.0, 4.99, 7.0], [60, 61, 62], [9, 9, 9])
  clipped = stitch.clip_to_duration(notes, 5.0)
  np.testing.assert_allclose(clipped.onset, [1.0, 4.5])
  np.testing.assert_allclose(clipped.offset, [5.0, 4.99])
  edge = stitch.clip_to_duration(notes_lib.Notes.create([4.995], [6.0], [60], [9]), 5.0)
  assert edge.offset[0] > edge.onset[0]  # a note keeps at least one step


def test_guess_carried_takes_the_latest_earlier_note_of_each_sounding_pitch():
  table = stitch.NoteTable.from_onset_tokens(TOKENS)
  np.testing.assert_array_equal(stitch.guess_carried(table, 2, [60, 48, 72, 90]), [2, 0, 3])
  np.testing.assert_array_equal(stitch.guess_carried(table, 0, [60]), np.zeros(0))
