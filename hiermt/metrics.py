"""The scoring protocol: mir_eval note metrics and frame metrics of one piece, and their mean.

Every number hiermt reports about transcription quality comes from here, so
the protocol is written down once (design.md §1, `PROTOCOL`):

* Whole pieces, no segmenting. The caller passes sustain-pedal-extended
  reference notes (`notes.read_midi` applies the pedal) for every metric.
* Note metrics as mir_eval defines them, with **pitches in Hz**
  (`mir_eval.util.midi_to_hz`; MIDI numbers p and p + 1 passed as Hz are
  1200 * log2((p + 1) / p) cents apart, under 50 for p >= 35, so notes a
  semitone apart would match):
  - "onset": onset within 50 ms, pitch within 50 cents, offsets ignored;
  - "onset_offset": also offset within max(50 ms, 20 % of the reference
    note's duration);
  - "onset_offset_velocity": also velocity within 0.1 after mir_eval's
    rescaling (estimated velocities fitted to the reference's, scaled to
    [0, 1]).
* Frame metrics on piano rolls at 100 frames per second, 128 pitches (see
  `piano_roll`), counted over all frames of the piece.
* A piece where the reference or the estimate has no notes scores 0 on every
  metric: mir_eval's convention (it warns and returns 0s), followed here
  without calling it, so no warning can turn into an error.

mir_eval builds dense [reference, estimate] distance matrices, which for a
MAESTRO piece of 20k+ notes need tens of GB. `match_notes` computes the same
hits only between notes whose onsets are close enough to match (both lists
are sorted by onset), with mir_eval's own formulas and rounding, builds the
graph in mir_eval's order and runs mir_eval's matcher on it, so the matching
(and with it every metric, velocity included) equals mir_eval's exactly;
tests/test_metrics.py checks that against mir_eval itself.
"""

import mir_eval
import numpy as np

from hiermt import notes as notes_lib

ONSET_TOLERANCE = 0.05  # seconds
OFFSET_RATIO = 0.2  # of the reference note's duration
OFFSET_MIN_TOLERANCE = 0.05  # seconds
VELOCITY_TOLERANCE = 0.1  # after rescaling to [0, 1]
PITCH_TOLERANCE_CENTS = 50.0
FRAMES_PER_SECOND = notes_lib.STEPS_PER_SECOND
NUM_PITCHES = 128

NOTE_METRICS = ("onset", "onset_offset", "onset_offset_velocity")
METRICS = NOTE_METRICS + ("frame",)
METRIC_KEYS = tuple(f"{m}_{s}" for m in METRICS for s in ("precision", "recall", "f1"))

PROTOCOL = {
    "onset_tolerance_s": ONSET_TOLERANCE,
    "offset_ratio": OFFSET_RATIO,
    "offset_min_tolerance_s": OFFSET_MIN_TOLERANCE,
    "velocity_tolerance": VELOCITY_TOLERANCE,
    "pitch_tolerance_cents": PITCH_TOLERANCE_CENTS,
    "pitch_unit": "Hz (mir_eval.util.midi_to_hz)",
    "reference": "sustain-pedal-extended notes (notes.read_midi) for every metric",
    "frames_per_second": FRAMES_PER_SECOND,
    "frame_convention": "frame k (time k/100 s) is active for pitch p if a note of pitch p has "
                        "onset_step <= k < offset_step, steps from notes.to_steps; 128 pitches; "
                        "all frames up to the later end of the two note sets",
    "empty": "reference or estimate without notes: every metric 0 (mir_eval's convention)",
    "average": "unweighted mean over pieces",
    "mir_eval_version": mir_eval.__version__,
}

# mir_eval rounds time distances to this many decimals before comparing (transcription.N_DECIMALS).
_DECIMALS = mir_eval.transcription.N_DECIMALS
# Candidate window slack: rounding can let a distance slightly above the tolerance match.
_WINDOW_SLACK = 10.0 ** -_DECIMALS


def _candidate_pairs(ref_onset, est_onset):
  """All (reference, estimate) index pairs whose onsets may match, in row-major order.

  Args:
    ref_onset, est_onset: float64 [n], [m], both sorted ascending.

  Returns:
    (ref_index, est_index), int64 [c] each, sorted by reference index, then
    estimate index: the order in which np.where lists hits of a dense matrix.
  """
  reach = ONSET_TOLERANCE + _WINDOW_SLACK
  lo = np.searchsorted(est_onset, ref_onset - reach, side="left")  # [n]
  hi = np.searchsorted(est_onset, ref_onset + reach, side="right")  # [n]
  counts = hi - lo  # [n]
  ref_index = np.repeat(np.arange(len(ref_onset)), counts)  # [c]
  # Within each reference's run, estimates count up from its lo.
  run_start = np.cumsum(counts) - counts  # [n]
  est_index = np.arange(counts.sum()) + np.repeat(lo - run_start, counts)  # [c]
  return ref_index, est_index


def match_notes(reference: notes_lib.Notes, estimate: notes_lib.Notes, offset_ratio=None) -> np.ndarray:
  """mir_eval's note matching (`mir_eval.transcription.match_notes`), without dense matrices.

  Onset tolerance 50 ms, pitch tolerance 50 cents on pitches in Hz, and with
  `offset_ratio` (None: offsets ignored) an offset tolerance of
  max(offset_ratio * reference duration, 50 ms); comparisons are `<=` after
  mir_eval's rounding of time distances.

  Returns:
    int64 [k, 2]: (reference index, estimate index) of each matched pair,
    sorted by reference index; identical to mir_eval's matching.
  """
  if len(reference) == 0 or len(estimate) == 0:
    return np.zeros((0, 2), np.int64)
  r, e = _candidate_pairs(reference.onset, estimate.onset)  # [c] each
  # The formulas below are mir_eval's, applied to the candidate pairs instead of outer products.
  hit = np.around(np.abs(reference.onset[r] - estimate.onset[e]), decimals=_DECIMALS) <= ONSET_TOLERANCE
  ref_log2 = np.log2(mir_eval.util.midi_to_hz(reference.pitch.astype(np.float64)))  # [n]
  est_log2 = np.log2(mir_eval.util.midi_to_hz(estimate.pitch.astype(np.float64)))  # [m]
  hit &= np.abs(1200 * (ref_log2[r] - est_log2[e])) <= PITCH_TOLERANCE_CENTS
  if offset_ratio is not None:
    duration = np.abs(reference.offset - reference.onset)  # [n]
    tolerance = np.maximum(offset_ratio * duration, OFFSET_MIN_TOLERANCE)  # [n]
    distance = np.around(np.abs(reference.offset[r] - estimate.offset[e]), decimals=_DECIMALS)
    hit &= distance <= tolerance[r]
  # mir_eval keys the graph by estimate, in order of first appearance in its row-major hit
  # list; the same graph gives the same maximum matching out of its matcher.
  graph = {}
  for ref_i, est_i in zip(r[hit].tolist(), e[hit].tolist()):
    graph.setdefault(est_i, []).append(ref_i)
  matching = sorted(mir_eval.util._bipartite_match(graph).items())  # pylint: disable=protected-access
  return np.array(matching, np.int64).reshape(-1, 2)


def velocity_matches(reference: notes_lib.Notes, estimate: notes_lib.Notes, matching: np.ndarray) -> np.ndarray:
  """Which matched pairs also match in velocity, as in `mir_eval.transcription_velocity.match_notes`.

  Reference velocities are scaled to [0, 1] by their min and max over the
  piece (range at least 1); the matched estimates' velocities are mapped onto
  them by a least-squares line; a pair matches if the error is below 0.1.

  Args:
    matching: int64 [k, 2] from `match_notes(..., offset_ratio=OFFSET_RATIO)`.

  Returns:
    bool [k].
  """
  if len(matching) == 0:
    return np.zeros(0, bool)
  ref_velocity = reference.velocity.astype(np.float64)  # [n]
  low, high = ref_velocity.min(), ref_velocity.max()
  ref_scaled = (ref_velocity - low) / max(1.0, high - low)  # [n] in [0, 1]
  ref_matched = ref_scaled[matching[:, 0]]  # [k]
  est_matched = estimate.velocity[matching[:, 1]].astype(np.float64)  # [k]
  design = np.stack([est_matched, np.ones_like(est_matched)], axis=1)  # [k, 2]
  slope, intercept = np.linalg.lstsq(design, ref_matched, rcond=None)[0]
  return np.abs(slope * est_matched + intercept - ref_matched) < VELOCITY_TOLERANCE


def _precision_recall_f1(true_positives, num_estimated, num_reference):
  """(precision, recall, f1), each 0 where its denominator is 0."""
  precision = true_positives / num_estimated if num_estimated else 0.0
  recall = true_positives / num_reference if num_reference else 0.0
  return float(precision), float(recall), float(mir_eval.util.f_measure(precision, recall))


def piano_roll(notes: notes_lib.Notes, num_frames: int) -> np.ndarray:
  """bool [num_frames, 128]: frame k is on for pitch p if a note of pitch p covers time k / 100 s.

  A note covers frames onset_step .. offset_step - 1, with the steps of
  `notes.to_steps` (nearest 10 ms step, at least one frame per note), the
  grid every other part of hiermt uses. Frames from `num_frames` on are cut.
  """
  onset, offset = notes_lib.to_steps(notes)  # int64 [n] each
  onset, offset = np.minimum(onset, num_frames), np.minimum(offset, num_frames)
  # +1 where a note starts, -1 after it ends; a running sum counts the notes sounding per pitch.
  change = np.zeros((num_frames + 1, NUM_PITCHES), np.int32)  # [frames + 1, 128]
  np.add.at(change, (onset, notes.pitch), 1)
  np.add.at(change, (offset, notes.pitch), -1)
  return np.cumsum(change[:-1], axis=0) > 0


def frame_metrics(reference: notes_lib.Notes, estimate: notes_lib.Notes) -> dict[str, float]:
  """Frame precision, recall and F1 over all frames of both piano rolls (`piano_roll`).

  Counts run over frames 0 .. the later offset step of the two note sets and
  all 128 pitches; 0 where a denominator is 0 (so also 0 when either side has
  no notes, like the note metrics).
  """
  ends = [notes_lib.to_steps(n)[1].max() for n in (reference, estimate) if len(n)]
  num_frames = int(max(ends, default=0))
  ref_roll = piano_roll(reference, num_frames)  # [frames, 128]
  est_roll = piano_roll(estimate, num_frames)  # [frames, 128]
  true_positives = int(np.count_nonzero(ref_roll & est_roll))
  precision, recall, f1 = _precision_recall_f1(
      true_positives, int(np.count_nonzero(est_roll)), int(np.count_nonzero(ref_roll)))
  return {"frame_precision": precision, "frame_recall": recall, "frame_f1": f1}


def note_metrics(reference: notes_lib.Notes, estimate: notes_lib.Notes) -> dict[str, float]:
  """All metrics of one whole piece (see the module docstring for the protocol).

  Args:
    reference: the ground truth, sustain-pedal-extended (as `notes.read_midi`
      returns it); it is the reference of every metric, offsets included.
    estimate: the transcription.

  Returns:
    {"onset_precision", "onset_recall", "onset_f1", "onset_offset_...",
    "onset_offset_velocity_...", "frame_..."}: floats in [0, 1], keys
    `METRIC_KEYS`. Every value is 0 when either side has no notes.
  """
  onset = match_notes(reference, estimate, offset_ratio=None)
  onset_offset = match_notes(reference, estimate, offset_ratio=OFFSET_RATIO)
  with_velocity = int(np.count_nonzero(velocity_matches(reference, estimate, onset_offset)))
  result = {}
  # With either side empty there are no hits, so every value is 0, as mir_eval returns.
  for name, hits in (("onset", len(onset)), ("onset_offset", len(onset_offset)),
                     ("onset_offset_velocity", with_velocity)):
    p, r, f = _precision_recall_f1(hits, len(estimate), len(reference))
    result.update({f"{name}_precision": p, f"{name}_recall": r, f"{name}_f1": f})
  result.update(frame_metrics(reference, estimate))
  return result


def mean_metrics(per_piece: list[dict]) -> dict[str, float]:
  """Unweighted mean over pieces of each metric.

  Args:
    per_piece: one dict per piece with the same numeric keys (e.g. from
      `note_metrics`).

  Raises:
    ValueError: no pieces, or pieces with different keys.
  """
  if not per_piece:
    raise ValueError("mean_metrics needs at least one piece")
  keys = list(per_piece[0])
  for i, piece in enumerate(per_piece):
    if set(piece) != set(keys):
      raise ValueError(f"piece {i} has metrics {sorted(piece)}, piece 0 has {sorted(keys)}")
  return {k: float(np.mean([piece[k] for piece in per_piece])) for k in keys}
