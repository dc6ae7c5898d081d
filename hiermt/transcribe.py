"""Audio in, MIDI out, with the trained stages of a workdir.

  python -m hiermt.transcribe --workdir=DIR [--layout=hierarchy|flatten|roll] [--checkpoint=best|latest]
      --output_dir=OUT AUDIO...

AUDIO are files (WAV, FLAC, MP3, OGG; any sample rate, stereo is averaged to
mono) or folders, whose audio files are all transcribed. Each becomes
OUT/<stem>.mid: one piano track with velocities and note-offs, written
atomically. An unreadable file is reported by name and the others are still
transcribed; the exit status is 1 when any file failed, 2 when the models
cannot be loaded.

Each stage is read from its best checkpoint (the highest validation note F1
during training, `hiermt.validation`) unless --checkpoint=latest; a stage
trained without validation has no best one and its latest is used (logged).

Layouts:
  hierarchy  onset_pitch -> velocity -> offset stages (the paper's method)
  flatten    the one-sequence baseline (`flatten` stage)
  roll       the encoder's own rolls (`encoder` stage), decoded with the
             encoder's published post-processing (hiermt/roll_notes.py)

The audio is cut into 10 s segments (the last one zero-padded); segments are
processed in chunks of `--batch_segments`, each chunk going through every stage
before the next, so memory stays bounded for any length. Within a chunk all
segments are decoded as one batch (hiermt/decode.py); notes sustained across
segments are stitched by hiermt/stitch.py, and a decoded note ends at the
latest where the next note of its key starts, notes of one key 40 ms apart or
less being one (`notes.one_note_per_key`: a MIDI file holds one sounding note
per key). Python API:

  t = transcribe.load(workdir, layout="hierarchy")
  notes = t.transcribe("piece.flac")     # or a float32 16 kHz mono array
"""

if __name__ == "__main__":
  # First, so the heavy imports below happen only in the process that stays.
  from hiermt import allocator
  allocator.use_tcmalloc()

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from hiermt import audio as audio_lib
from hiermt import checkpoint
from hiermt import command_logging
from hiermt import decode
from hiermt import notes as notes_lib
from hiermt import roll_notes
from hiermt import stitch
from hiermt import vocabulary as vocab
from hiermt.data import rolls as rolls_lib
from hiermt.models import transcriber

LAYOUTS = {"hierarchy": ("onset_pitch", "velocity", "offset"), "flatten": ("flatten",), "roll": ("encoder",)}
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".aif", ".aiff")
SEGMENT_SAMPLES = int(vocab.SEGMENT_SECONDS * audio_lib.SAMPLE_RATE)
# A pitch counts as still sounding at a segment start when its frame roll is on there (offset-chain guess).
_SOUNDING_THRESHOLD = 0.5
_NOTE_BUCKET = 32
BATCH_SEGMENTS = 8  # default 10 s segments decoded as one batch


def _train_command(stage, workdir):
  return f"python -m hiermt.main --config=configs/base.py:{stage} --workdir={workdir}"


def available_layouts(workdir) -> list[str]:
  """The layouts whose stages all have a checkpoint in `workdir` (in LAYOUTS order)."""
  return [layout for layout, stages in LAYOUTS.items()
          if all(checkpoint.has_checkpoint(checkpoint.stage_dir(workdir, s)) for s in stages)]


def _roll_window_starts(samples):
  """First samples of the Roll layout's 10 s windows, every 5 s, over `samples` padded to whole segments."""
  return range(0, samples - SEGMENT_SAMPLES // 2, SEGMENT_SAMPLES // 2)


def _pow2_at_most(n, cap):
  """The smallest power of two >= n, but at most `cap` (bounds the number of compiled shapes)."""
  return min(cap, 1 << max(0, int(n) - 1).bit_length())


class StageModel:
  """One stage: its config, module, variables and jitted encoder / decoding loop.

  `from_workdir` loads a trained stage; training-time validation builds one from
  the run's config and swaps in the current variables before each pass (the jitted
  programs take the variables as arguments, so nothing recompiles).
  """

  def __init__(self, config, variables, step=None, fixed_tokens=None, roll_thresholds=None, dtype=None):
    """Builds the stage `config.stage` of `config` around `variables`.

    Args:
      config: the stage's config (`configs/base.py`, or its config.json).
      variables: {"params": ..., "batch_stats": ...} (empty collections dropped), or None
        to set the `variables` attribute later.
      step: the training step the variables are from.
      fixed_tokens: see `load`.
      roll_thresholds: the encoder stage's Roll thresholds, overriding the config's
        `roll` (those calibrated on validation for this checkpoint).
      dtype: the decoder's compute dtype while decoding ("float32" or "bfloat16";
        None: the one it was trained with, `train.dtype`), as in training: norms
        and logits stay float32. The encoder keeps its training dtype: bfloat16
        saves decoding memory traffic, not convolution time (the full HPPNet's
        forward takes 1.7x longer in bfloat16 on a CPU, README).
    """
    self.config = config
    self.stage = config.stage
    self.step = step
    # Configs from before `roll` existed fall back to the published thresholds.
    self.roll_thresholds = dict(config.roll) if "roll" in config else None
    if roll_thresholds:
      self.roll_thresholds = dict(self.roll_thresholds or {}, **roll_thresholds)
    # Stage 1 of the hierarchy only: a pitch written with a lower probability closes its onset and its
    # note is left out. Flatten decodes greedily whatever its config says.
    self.min_pitch_prob = (float(config.get("decode", {}).get("min_pitch_prob", 0.0))
                           if self.stage == "onset_pitch" else 0.0)
    self.model = transcriber.build_model(config)
    self.variables = {k: v for k, v in (variables or {}).items() if v}
    self.frames_per_second = type(self.model.encoder).FRAMES_PER_SECOND
    self._encode = jax.jit(lambda v, a: self.model.apply(v, a, method=lambda m, x: m.encoder(x, train=False)))
    decoding = self.model
    if dtype is not None and dtype != config.train.dtype:
      decode_config = ml_collections.ConfigDict(config.to_dict())
      decode_config.train.dtype = dtype
      decoding = transcriber.build_model(decode_config)
    if self.stage == "encoder":
      self._decode = None
    elif fixed_tokens and self.stage in decode.FREE_STAGES:
      self._decode = decode.jitted(decoding, self.stage, min(fixed_tokens, config.data.max_tokens),
                                   stop_at_eos=False)
    else:
      self._decode = decode.jitted(decoding, self.stage, config.data.max_tokens)

  @classmethod
  def from_workdir(cls, workdir, stage, fixed_tokens=None, which="best", dtype=None) -> "StageModel":
    """The trained stage `stage` of `workdir`, from its best or latest checkpoint (`checkpoint.load_variables`).

    Raises:
      FileNotFoundError: the stage is not trained, naming the command that trains it.
      ValueError: the checkpoint does not fit the model of its config.json (`checkpoint.check_variables`).
    """
    directory = checkpoint.stage_dir(workdir, stage)
    hint = f"Train it first: {_train_command(stage, workdir)}"
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
      raise FileNotFoundError(f"stage {stage!r} is not trained in {workdir} (no {config_path}). {hint}")
    with open(config_path) as f:
      config = ml_collections.ConfigDict(json.load(f))
    if config.stage != stage:
      raise ValueError(f"{config_path} is for stage {config.stage!r}, expected {stage!r}")
    variables, choice = checkpoint.load_variables(directory, f"Stage {stage!r} has no checkpoint yet. {hint}", which)
    thresholds = None
    if stage == "encoder":
      thresholds = roll_notes.stored_thresholds(choice.metrics, config.encoder.name)
      if thresholds:
        logging.info("Roll thresholds calibrated on validation for step %d: %s", choice.step,
                     ", ".join(f"{k} {v:.2f}" for k, v in thresholds.items()))
    loaded = cls(config, variables, choice.step, fixed_tokens, thresholds, dtype)
    inputs = transcriber.example_inputs(config)
    expected = jax.eval_shape(lambda: loaded.model.init(jax.random.key(0), *inputs, train=False))
    checkpoint.check_variables(loaded.variables, {k: v for k, v in expected.items() if k in loaded.variables},
                               directory)
    return loaded

  def encode(self, segments, batch=None):
    """Encoder outputs (rolls and `features`) of float32 audio [rows, samples], as device arrays
    with `batch` rows (default: rows).

    The rows are encoded in power-of-two pieces (6 rows: 4 + 2), not padded with silence: the
    encoder's cost grows with every row it runs on. Rows past `rows` repeat row 0's outputs, so a
    decoding loop over the batch ends when the real rows do.
    """
    segments = np.asarray(segments, np.float32)
    rows = len(segments)
    batch = rows if batch is None else batch
    pieces, start = [], 0
    while start < rows:
      size = 1 << ((rows - start).bit_length() - 1)  # the largest power of two that fits
      pieces.append(self._encode(self.variables, jnp.asarray(segments[start:start + size])))
      start += size
    out = pieces[0] if len(pieces) == 1 else jax.tree.map(lambda *x: jnp.concatenate(x), *pieces)
    if batch > rows:
      out = jax.tree.map(lambda x: jnp.concatenate([x, jnp.repeat(x[:1], batch - rows, axis=0)]), out)
    return out

  def free(self, features, rows, carriable=None):
    """Free decoding (onset_pitch, flatten) of the first `rows` of `features`: (int32 tokens, float32 token
    probabilities), each [rows, max_len]. `carriable`: bool [batch, NUM_PITCHES], the pitches each row may
    list as carried in (`decode.free_run`)."""
    tokens, probs = self._decode(self.variables["params"], features, carriable, self.min_pitch_prob)
    return np.asarray(tokens)[:rows], np.asarray(probs)[:rows]

  @property
  def max_notes(self):
    """Most notes one forced sequence holds: <sos> <task> (on pitch answer)* <eos> in max_tokens."""
    return (self.config.data.max_tokens - 3) // 3

  def forced(self, features, queries, table):
    """Forced decoding (velocity, offset) of one query per feature row.

    Args:
      features: [batch, frames, d_enc] (batch >= len(queries); extra rows are padding).
      queries: list of (segment k, note ids, number carried in), one per row.
      table: the piece's `stitch.NoteTable`.

    Returns:
      One answer-token array per query. Notes past `max_notes` in a segment are
      not decoded; they get the stage's placeholder (logged).
    """
    cap = self.max_notes
    longest = max([len(ids) for _, ids, _ in queries] + [1])
    width = min(cap, -(-longest // _NOTE_BUCKET) * _NOTE_BUCKET)
    on = np.full((features.shape[0], width), vocab.PAD, np.int32)
    pitch = np.full_like(on, vocab.PAD)
    count = np.zeros(features.shape[0], np.int32)
    for row, (k, ids, carried) in enumerate(queries):
      ids = ids[:cap]
      count[row] = len(ids)
      on[row, :len(ids)], pitch[row, :len(ids)] = table.tokens(ids, k, carried)
    answers = np.asarray(self._decode(self.variables["params"], features, on, pitch, count))
    out = []
    for row, (k, ids, carried) in enumerate(queries):
      answer = np.concatenate([answers[row, :count[row]], self._placeholder(table, ids[cap:], k)])
      out.append(answer.astype(np.int32))
      if len(ids) > cap:
        logging.warning("segment %d has %d notes; the %s stage holds %d (config.data.max_tokens); "
                        "placeholders for the rest", k, len(ids), self.stage, cap)
    return out

  def _placeholder(self, table, ids, k):
    if self.stage == "velocity":
      return np.full(len(ids), vocab.velocity_id(vocab.PLACEHOLDER_VELOCITY))
    start = np.maximum(table.onset[ids] - k * vocab.SEGMENT_STEPS, 0)
    return vocab.time_id(np.minimum(start + vocab.PLACEHOLDER_DURATION_STEPS, vocab.SEGMENT_STEPS))


class _Reference:
  """Reference notes standing in for the hierarchy stages a transcriber does not hold.

  Training-time validation scores one stage at a time: the velocity stage, say,
  answers for the reference's onsets and pitches, and the reference supplies the
  offsets. The table lists the reference's notes in `vocabulary.encode_segment`'s
  order (onset, pitch, offset, velocity), the order the stages were trained on.
  """

  def __init__(self, notes):
    onset, offset = notes_lib.to_steps(notes)  # int64 [n] each
    order = np.lexsort((notes.velocity, offset, notes.pitch, onset))
    pitch = notes.pitch[order].astype(np.int64)
    self.table = stitch.NoteTable(onset[order] // vocab.SEGMENT_STEPS, onset[order], pitch)
    self._keys = _note_keys(self.table)  # [n], non-decreasing
    self._velocity = notes.velocity[order]
    self._offset = offset[order]

  def _match(self, table):
    """Reference index of each note of `table` [m]: the k-th note of an (onset step, pitch) takes
    the reference's k-th note of that key; -1 where the reference has none."""
    keys = _note_keys(table)  # [m], non-decreasing: tables are in onset, pitch order
    rank = np.arange(len(keys)) - np.searchsorted(keys, keys, side="left")  # [m]
    index = np.searchsorted(self._keys, keys, side="left") + rank  # [m]
    return np.where(index < np.searchsorted(self._keys, keys, side="right"), index, -1)

  def velocities(self, table) -> np.ndarray:
    """int64 [m]: the reference velocity of each note of `table`, PLACEHOLDER_VELOCITY where it has none."""
    index = self._match(table)
    velocity = np.full(len(index), vocab.PLACEHOLDER_VELOCITY, np.int64)
    velocity[index >= 0] = self._velocity[index[index >= 0]]
    return velocity

  def offsets(self, table) -> dict:
    """Note id -> reference offset step for the notes of `table` the reference has (the others end with
    the audio, as `stitch.piece_notes` ends notes without an offset)."""
    index = self._match(table)
    return {i: int(self._offset[j]) for i, j in enumerate(index.tolist()) if j >= 0}


def _note_keys(table):
  """int64 [n]: one number per (onset step, pitch) of a table's notes (MIDI pitches are < 128)."""
  return table.onset * 128 + table.pitch


class NoteTranscriber:
  """Trained stages of one layout; `transcribe(audio)` -> Notes. Build with `load`.

  A hierarchy transcriber may hold only some of its stages when `transcribe` gets
  reference notes for the others (`given`).
  """

  def __init__(self, layout, stages, batch_segments):
    self.layout = layout
    self.stages = stages
    self.batch_segments = batch_segments
    self.last_chain = []  # (rounds, decoded segments, segments) of each chunk's offset chain, for benchmarks
    # Stages trained with a frozen encoder from one checkpoint hold the same encoder: run it once for all.
    self.encoder_of = {}
    for name, stage in stages.items():
      self.encoder_of[name] = next((other for other in self.encoder_of.values()
                                    if _same_encoder(stages[other], stage)), name)

  def _encoded(self, chunk, cache, stage):
    """Encoder outputs of the segments `chunk` for `stage`, in a `_batch` of rows, shared between
    stages with the same encoder."""
    owner = self.encoder_of[stage]
    if owner not in cache:
      cache[owner] = self.stages[owner].encode(chunk, self._batch(len(chunk)))
    return cache[owner]

  def transcribe(self, audio, progress=False, name="", given=None) -> notes_lib.Notes:
    """Notes of a recording.

    Args:
      audio: a path (any format `audio.load_audio` reads) or float32 [samples] 16 kHz mono audio.
      progress: show one progress bar per stage.
      name: label of the progress bars (default: the file name).
      given: reference Notes of the recording that supply what the hierarchy stages this
        transcriber lacks would decide: onsets and pitches, velocities, offsets (of decoded
        notes at the same 10 ms step and pitch; PLACEHOLDER_VELOCITY, or an end with the
        audio, where the reference has no such note). Other layouts hold all their stages
        and ignore it.

    Raises:
      audio.AudioError: the file cannot be decoded.
      ValueError: a hierarchy stage is missing and `given` is None.
    """
    missing = [s for s in LAYOUTS[self.layout] if s not in self.stages]
    if missing and given is None:
      raise ValueError(f"this {self.layout} transcriber lacks the {', '.join(missing)} stage(s): "
                       "pass given= reference notes to stand in for them")
    if isinstance(audio, (str, os.PathLike)):
      name = name or os.path.basename(os.fspath(audio))
      audio = audio_lib.load_audio(audio)
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 1:
      raise ValueError(f"audio must be mono [samples] at {audio_lib.SAMPLE_RATE} Hz, got shape {audio.shape}; "
                       "average the channels first (or pass the file path)")
    duration = len(audio) / audio_lib.SAMPLE_RATE
    if not len(audio):
      return notes_lib.Notes.empty()
    count = -(-len(audio) // SEGMENT_SAMPLES)
    segments = audio_lib.pad_or_crop(audio, count * SEGMENT_SAMPLES).reshape(count, SEGMENT_SAMPLES)
    totals = {s: count for s in self.stages}
    if self.layout == "roll":
      totals["encoder"] = len(_roll_window_starts(count * SEGMENT_SAMPLES))
    bars = {s: tqdm.tqdm(total=totals[s], desc=f"{name or 'audio'} [{s}]", unit="seg", disable=not progress,
                         leave=False) for s in self.stages}
    try:
      if self.layout == "hierarchy":
        return self._hierarchy(segments, duration, bars, given)
      run = {"flatten": self._flatten, "roll": self._roll}[self.layout]
      return run(segments, duration, bars)
    finally:
      for bar in bars.values():
        bar.close()

  def _chunks(self, count):
    for start in range(0, count, self.batch_segments):
      yield start, min(count, start + self.batch_segments)

  def _batch(self, rows):
    """Rows of the decoding batch of a chunk of `rows` segments: a power of two, which bounds the
    number of compiled decoding loops."""
    return _pow2_at_most(rows, self.batch_segments)

  def _hierarchy(self, segments, duration, bars, given):
    onset, velocity, offset = (self.stages.get(s) for s in LAYOUTS["hierarchy"])
    reference = _Reference(given) if given is not None else None
    table = stitch.NoteTable.from_onset_tokens([]) if onset is not None else reference.table
    velocities, offsets, carried = [], {}, np.zeros(0, np.int64)
    self.last_chain = []
    for start, stop in self._chunks(len(segments)):
      chunk, rows = segments[start:stop], stop - start
      ks = range(start, stop)
      encoded = {}
      if onset is not None:
        tokens = decode.drop_unsure_notes(*onset.free(self._encoded(chunk, encoded, "onset_pitch")["features"], rows),
                                          onset.min_pitch_prob)
        table = table.extend(stitch.NoteTable.from_onset_tokens(tokens, first_segment=start))
        bars["onset_pitch"].update(rows)

      if velocity is not None:
        queries = [(k, table.inside(k), 0) for k in ks]
        answers = velocity.forced(self._encoded(chunk, encoded, "velocity")["features"], queries, table)
        velocities += [vocab.id_to_velocity(a) for a in answers]
        bars["velocity"].update(rows)

      if offset is not None:
        result = self._offset_chain(offset, self._encoded(chunk, encoded, "offset"), table, start, ks, carried)
        offsets.update(result.offset)
        carried = result.carried_out
        self.last_chain.append((result.rounds, result.decoded_segments, rows))
        bars["offset"].update(rows)
    if velocity is None:
      note_velocity = reference.velocities(table)
    else:
      note_velocity = np.concatenate(velocities) if velocities else np.zeros(0, np.int64)
    if offset is None:
      offsets = reference.offsets(table)
    return stitch.piece_notes(table, note_velocity, offsets, duration)

  def _offset_chain(self, offset, out, table, start, ks, carried):
    """Stage 3 of one chunk (segments `ks`, the first carrying in `carried`): `stitch.chain_offsets`
    with the carried-in lists guessed from the offset stage's frame roll `out`."""
    sounding = _sounding_at_start(out["frame"])  # [batch, NUM_PITCHES]
    guesses = {k: stitch.guess_carried(table, k, np.flatnonzero(sounding[k - start])) for k in ks}
    features = out["features"]

    def decode_rows(queries):
      rows_of = np.array([k - start for k, _, _ in queries])
      batch = self._batch(len(rows_of))
      picked = features[np.pad(rows_of, (0, batch - len(rows_of)))]
      return offset.forced(picked, queries, table)

    return stitch.chain_offsets(table, ks, carried, guesses, decode_rows)

  def _flatten(self, segments, duration, bars):
    stage = self.stages["flatten"]
    tokens = []
    for start, stop in self._chunks(len(segments)):
      chunk, rows = segments[start:stop], stop - start
      out = stage.encode(chunk, self._batch(rows))
      carriable = _sounding_at_start(out["frame"])  # [batch, NUM_PITCHES]
      if start == 0:
        carriable[0] = False  # a piece's first segment: nothing sounds before the audio starts
      tokens += list(stage.free(out["features"], rows, carriable)[0])
      bars["flatten"].update(rows)
    return stitch.clip_to_duration(notes_lib.one_note_per_key(vocab.decode_piece(tokens, "flatten")), duration)

  def _roll(self, segments, duration, bars):
    stage = self.stages["encoder"]
    rolls = self.piece_rolls(segments.reshape(-1), bars["encoder"])
    notes = roll_notes.rolls_to_notes(rolls, stage.config.encoder.name, stage.frames_per_second,
                                      stage.roll_thresholds)
    return stitch.clip_to_duration(notes, duration)

  def piece_rolls(self, audio, bar=None) -> dict:
    """The encoder stage's rolls of a whole recording, as Kong's inference assembles them.

    10 s windows every 5 s each keep their middle half (the first and last
    window their outer quarter too), so no frame is predicted at the edge of
    a window.

    Args:
      audio: float32 [samples] 16 kHz mono.
      bar: optional tqdm bar, advanced per window.

    Returns:
      {"onset", "offset", "frame", "velocity"}: float32 [frames, 88] at the
      encoder's frame rate, covering the audio zero-padded to whole 10 s segments.
    """
    stage = self.stages["encoder"]
    audio = audio_lib.pad_or_crop(audio, max(1, -(-len(audio) // SEGMENT_SAMPLES)) * SEGMENT_SAMPLES)
    windows = np.stack([audio[s:s + SEGMENT_SAMPLES] for s in _roll_window_starts(len(audio))])  # [w, samples]
    per_window = int(vocab.SEGMENT_SECONDS * stage.frames_per_second)  # the window's extra last frame is dropped
    quarter = per_window // 4
    rolls = {k: [] for k in roll_notes.ROLL_NAMES}
    if bar is not None:
      bar.total = len(windows)
    for start, stop in self._chunks(len(windows)):
      out = stage.encode(windows[start:stop])
      for key, parts in rolls.items():
        values = np.asarray(out[key])
        for w in range(start, stop):
          lo = 0 if w == 0 else quarter
          hi = per_window if w == len(windows) - 1 else per_window - quarter
          parts.append(values[w - start, lo:hi])
      if bar is not None:
        bar.update(stop - start)
    return {k: np.concatenate(v) for k, v in rolls.items()}


def _sounding_at_start(frame):
  """bool [batch, NUM_PITCHES] over MIDI pitches: where the frame roll `frame` [batch, frames, 88]
  (mean of each segment's first two frames) is on: the notes a segment may have carried in."""
  keys = np.asarray(frame[:, :2].mean(axis=1)) >= _SOUNDING_THRESHOLD  # [batch, 88]
  sounding = np.zeros((len(keys), vocab.NUM_PITCHES), bool)
  sounding[:, rolls_lib.MIN_PITCH:rolls_lib.MIN_PITCH + rolls_lib.NUM_KEYS] = keys
  return sounding


def _same_encoder(a: StageModel, b: StageModel) -> bool:
  """Whether two stages hold identical encoders (architecture and every variable)."""
  if a.config.encoder.to_dict() != b.config.encoder.to_dict() or a.config.train.dtype != b.config.train.dtype:
    return False
  trees = [{c: v.get("encoder", {}) for c, v in s.variables.items()} for s in (a, b)]
  if jax.tree.structure(trees[0]) != jax.tree.structure(trees[1]):
    return False
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(trees[0]), jax.tree.leaves(trees[1])))


def load(workdir, layout="hierarchy", batch_segments=BATCH_SEGMENTS, fixed_tokens=None,
         which="best", dtype=None, min_pitch_prob=None) -> NoteTranscriber:
  """The trained stages of `layout` in `workdir`, ready to transcribe.

  Args:
    workdir: the run directory (WORKDIR/STAGE/ per stage).
    layout: "hierarchy", "flatten" or "roll".
    batch_segments: 10 s segments decoded as one batch (memory grows with it).
    fixed_tokens: benchmarks only: every free-running segment writes exactly
      this many tokens (`<eos>` masked), so timings with untrained weights
      reflect a chosen note density.
    which: each stage's "best" checkpoint (highest validation score during
      training; the latest, with a warning, where none has a score) or its "latest".
    dtype: the decoders' compute dtype, "float32" or "bfloat16" (None: each
      stage's training dtype). bfloat16 decodes with half-size weights and caches:
      faster, but its notes can differ from float32's. Encoders keep theirs.
    min_pitch_prob: hierarchy: a stage-1 pitch written with a lower probability closes its
      onset time and its note is left out (`decode.free_run`, `decode.drop_unsure_notes`;
      0: plain greedy). None: the onset_pitch stage's `decode.min_pitch_prob` (0 in
      configs saved before it existed).

  Raises:
    FileNotFoundError: a stage of the layout is not trained; the message names
      it and the command that trains it.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
  if batch_segments < 1:
    raise ValueError(f"batch_segments must be >= 1, got {batch_segments}")
  workdir = os.path.abspath(os.path.expanduser(workdir))
  if dtype is not None and dtype not in transcriber.DTYPES:
    raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(transcriber.DTYPES)}")
  if min_pitch_prob is not None and not 0.0 <= min_pitch_prob <= 1.0:
    raise ValueError(f"min_pitch_prob must be a probability in [0, 1], got {min_pitch_prob}")
  stages = {s: StageModel.from_workdir(workdir, s, fixed_tokens, which, dtype) for s in LAYOUTS[layout]}
  if min_pitch_prob is not None and "onset_pitch" in stages:
    stages["onset_pitch"].min_pitch_prob = min_pitch_prob
  cache = next(iter(stages.values())).config.data.cache_dir
  jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.expanduser(cache), "xla"))
  return NoteTranscriber(layout, stages, batch_segments)


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------
def _define_flags():
  """Command-line flags, defined only when run as a script (importing this module defines none)."""
  flags.DEFINE_string("workdir", None, "Run directory with the trained stages (WORKDIR/STAGE/).")
  flags.DEFINE_enum("layout", "hierarchy", list(LAYOUTS),
                    "hierarchy (3 LM stages), flatten (1 LM stage) or roll (the encoder's rolls).")
  flags.DEFINE_string("output_dir", None, "Folder for the MIDI files (OUT/<stem>.mid).")
  flags.DEFINE_integer("batch_segments", BATCH_SEGMENTS, "10 s segments decoded as one batch (memory grows with it).")
  flags.DEFINE_enum("checkpoint", "best", list(checkpoint.CHOICES),
                    "Each stage's best checkpoint (highest validation note F1 during training; the latest "
                    "where none was scored) or its latest.")
  flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                    "The decoders' compute dtype (default: the one each stage was trained with; encoders keep "
                    "theirs). bfloat16 decodes faster "
                    "(half-size weights and caches) but its notes can differ from float32's.")
  flags.DEFINE_float("min_pitch_prob", None,
                     "Hierarchy: a pitch the onset_pitch stage writes with a lower probability closes its onset "
                     "time to further notes and its note is left out (0: plain greedy decoding; default: the "
                     "stage's config, decode.min_pitch_prob).",
                     lower_bound=0.0, upper_bound=1.0)


def audio_files(arguments) -> tuple[list[str], list[str]]:
  """(audio files, missing arguments): files as given, folders expanded to their audio files (sorted)."""
  files, missing = [], []
  for arg in arguments:
    if os.path.isdir(arg):
      files += sorted(os.path.join(arg, f) for f in os.listdir(arg)
                      if f.lower().endswith(AUDIO_EXTENSIONS) and not f.startswith("."))
    elif os.path.isfile(arg):
      files.append(arg)
    else:
      missing.append(arg)
  return files, missing


def main(argv):
  command_logging.hiermt_info_only()
  FLAGS = flags.FLAGS  # noqa: N806
  arguments = argv[1:]
  if not arguments:
    raise app.UsageError("name at least one audio file or folder to transcribe")
  if not FLAGS.workdir or not FLAGS.output_dir:
    raise app.UsageError("--workdir and --output_dir are required")
  files, missing = audio_files(arguments)
  for arg in missing:
    print(f"transcribe: {arg}: no such file or folder", file=sys.stderr)
  stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
  clashes = sorted({s for s in stems if stems.count(s) > 1})
  if clashes:
    raise app.UsageError(f"several inputs would write the same MIDI file: {', '.join(s + '.mid' for s in clashes)}; "
                         "transcribe them into different --output_dir folders")
  if not files:
    print("transcribe: no audio files found (extensions: " + " ".join(AUDIO_EXTENSIONS) + ")", file=sys.stderr)
    sys.exit(1)
  try:
    transcriber_ = load(FLAGS.workdir, FLAGS.layout, FLAGS.batch_segments, which=FLAGS.checkpoint,
                        dtype=FLAGS.dtype, min_pitch_prob=FLAGS.min_pitch_prob)
  except (FileNotFoundError, ValueError) as e:
    print(f"transcribe: {e}", file=sys.stderr)
    sys.exit(2)
  failed = len(missing)
  for path, stem in zip(files, stems):
    target = os.path.join(FLAGS.output_dir, stem + ".mid")
    try:
      notes = transcriber_.transcribe(path, progress=True)
    except (audio_lib.AudioError, ValueError) as e:
      print(f"transcribe: {path}: FAILED: {e}", file=sys.stderr)
      failed += 1
      continue
    notes_lib.write_midi(notes, target)
    print(f"{path} -> {target} ({len(notes)} notes)")
  if failed:
    print(f"transcribe: {failed} of {len(files) + len(missing)} inputs failed", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
