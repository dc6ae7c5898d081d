"""Validation that measures transcription: validation pieces decoded with the current parameters.

Every `train.eval_every` steps the trainer transcribes the first
`train.eval_pieces` pieces of the validation split (each cut to its first
`train.eval_seconds`; 0 keeps whole pieces) with the transcription code itself
(`transcribe.NoteTranscriber`, so what is measured is what `transcribe` does)
and scores them under the evaluation protocol (`metrics.note_metrics`, mean
over pieces). Each stage is scored on what it decides, the other parts of each
note taken from the reference:

  encoder      Roll decoding of its heads (`roll_notes`): On, On-Off, On-Off-Vel F1
  onset_pitch  On F1
  velocity     velocities of the reference's notes: On-Off-Vel F1
  offset       offsets of the reference's onsets and pitches: On-Off F1
  flatten      On, On-Off, On-Off-Vel F1

With `train.calibrate_roll` the encoder's Roll thresholds are first chosen on
these pieces (`roll_notes.calibrate`) and the F1s are those at the chosen
thresholds, which are saved with the checkpoint and used by `transcribe` (an
encoder early in training can put every onset below the published threshold
and score 0 however good its rolls are).

A stage's last metric is its score, by which the best checkpoint is kept
(`checkpoint.SCORE`). With whole pieces the numbers are those of
`python -m hiermt.evaluate --split=validation --max_pieces=N` for the roll and
flatten layouts.

Process 0 transcribes; the others wait for its numbers (one broadcast), so every
process logs and saves the same score and no process waits on a collective the
others skip.
"""

import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from hiermt import audio as audio_lib
from hiermt import metrics
from hiermt import notes as notes_lib
from hiermt import partitioning
from hiermt import roll_notes
from hiermt import stitch
from hiermt import transcribe
from hiermt.data import pipeline
from hiermt.data import prepare

_ALL = ("onset_f1", "onset_offset_f1", "onset_offset_velocity_f1")
# What each stage decides; the last one is its score.
STAGE_METRICS = {
    "encoder": _ALL,
    "onset_pitch": ("onset_f1",),
    "velocity": ("onset_offset_velocity_f1",),
    "offset": ("onset_offset_f1",),
    "flatten": _ALL,
}


def score_key(stage: str) -> str:
  """The metric that ranks a stage's checkpoints."""
  return STAGE_METRICS[stage][-1]


def layout_of(stage: str) -> str:
  """The transcription layout a stage belongs to."""
  return next(layout for layout, stages in transcribe.LAYOUTS.items() if stage in stages)


def load_pieces(store, count, seconds) -> list[tuple[np.ndarray, notes_lib.Notes]]:
  """The first `count` pieces of a prepared split as (float32 [samples] audio, sustain-extended reference).

  Each piece is cut to its first `seconds` (0: whole), its reference with it
  (notes from the cut on dropped, notes sounding past it ended there).
  """
  pieces = []
  for i in range(min(count, len(store))):
    audio = np.asarray(store.audio(i), np.float32) / 32768.0  # int16 -> [-1, 1), as the train step scales it
    reference = store.notes(i)
    if seconds > 0:
      audio = audio[:int(round(seconds * store.sample_rate))]
      reference = stitch.clip_to_duration(reference, len(audio) / store.sample_rate)
    pieces.append((audio, reference))
  return pieces


def score(transcriber, stage, pieces, calibrate=False) -> dict[str, float]:
  """Mean over `pieces` of the metrics `stage` decides (`STAGE_METRICS`).

  Args:
    transcriber: a `transcribe.NoteTranscriber` holding `stage`; hierarchy stages
      take the other stages' parts from each piece's reference.
    stage: the stage scored.
    pieces: (audio, reference notes) pairs, as `load_pieces` returns them.
    calibrate: encoder stage only: choose the Roll thresholds on the pieces first;
      the result then also holds them (`roll_notes.calibrated_key`).
  """
  if calibrate:
    model = transcriber.stages["encoder"]
    rolls = [(transcriber.piece_rolls(audio), reference, len(audio) / audio_lib.SAMPLE_RATE)
             for audio, reference in pieces]
    thresholds, mean = roll_notes.calibrate(rolls, model.config.encoder.name, model.frames_per_second,
                                            model.roll_thresholds)
    return {**{key: mean[key] for key in STAGE_METRICS[stage]},
            **{roll_notes.calibrated_key(name): value for name, value in thresholds.items()}}
  rows = [metrics.note_metrics(reference, transcriber.transcribe(audio, given=reference))
          for audio, reference in pieces]
  mean = metrics.mean_metrics(rows)
  return {key: mean[key] for key in STAGE_METRICS[stage]}


class Validator:
  """Scores the train state's parameters on the validation pieces; built once per run.

  Call it with the state on every process at the same steps.
  """

  def __init__(self, config, mesh):
    self.stage = config.stage
    self._calibrate = self.stage == "encoder" and config.train.calibrate_roll
    # Numbers saved with the checkpoint beside its score (`checkpoint.save`'s `extra`).
    self.saved_keys = tuple(roll_notes.calibrated_key(name) for name in
                            roll_notes.DEFAULT_THRESHOLDS[config.encoder.name]) if self._calibrate else ()
    self.keys = STAGE_METRICS[self.stage] + self.saved_keys
    # The parameters as one full copy on a device of each process (from any sharding, also across
    # processes): transcription runs on one device, as `transcribe` does.
    self._replicate = jax.jit(lambda tree: tree, out_shardings=partitioning.replicated(mesh))
    self._is_main = jax.process_index() == 0
    # Every process opens the store (its first use is a barrier) and checks it; only process 0 reads pieces.
    store = prepare.Store(pipeline.prepared_dir(config), config.data.eval_split)
    if not len(store):
      raise ValueError(f"train.eval_pieces={config.train.eval_pieces} but the {config.data.eval_split!r} split "
                       "has no pieces; set --config.train.eval_pieces=0 to train without validation")
    self._pieces, self._transcriber = [], None
    if self._is_main:
      self._pieces = load_pieces(store, config.train.eval_pieces, config.train.eval_seconds)
      self._model = transcribe.StageModel(config, None)
      self._transcriber = transcribe.NoteTranscriber(layout_of(self.stage), {self.stage: self._model},
                                                     transcribe.BATCH_SEGMENTS)
    self._passes = 0

  def __call__(self, state) -> dict[str, float]:
    """The stage's metrics (`STAGE_METRICS`) for `state.weights()` (the parameters' moving average
    when the run keeps one), the same on every process."""
    replicated = self._replicate({"params": state.weights(), "batch_stats": state.batch_stats})
    values = np.zeros(len(self.keys), np.float64)
    if self._is_main:
      if not self._passes:
        seconds = sum(len(audio) for audio, _ in self._pieces) / audio_lib.SAMPLE_RATE
        logging.info("validation: transcribing %d piece(s), %.0f s of audio, with the %s stage "
                     "(this first pass compiles its programs)", len(self._pieces), seconds, self.stage)
      start = time.time()
      self._model.variables = {k: jax.tree.map(lambda x: x.addressable_data(0), v)
                               for k, v in replicated.items() if v}
      try:
        scores = score(self._transcriber, self.stage, self._pieces, self._calibrate)
      finally:
        self._model.variables = {}  # frees the device copy between passes
      values = np.array([scores[k] for k in self.keys], np.float64)
      logging.info("validation: %d piece(s) in %.1f s", len(self._pieces), time.time() - start)
    del replicated
    self._passes += 1
    values = multihost_utils.broadcast_one_to_all(values)
    return dict(zip(self.keys, values.tolist()))
