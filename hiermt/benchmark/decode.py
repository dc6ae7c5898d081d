"""`--what=decode`: how long decoding one dense piece takes, hiermt's way and the official way.

Only the decoders run: weights are random, the encoder features are random
arrays of the encoder's shape, and every strategy does the same, fixed work.
A piece of `piece_seconds` is cut into ceil(piece_seconds / 10) segments of
n notes each; per segment stage 1 (`onset_pitch`) writes 2n tokens, stages 2
and 3 (`velocity`, `offset`) answer the same n given notes, and `flatten`
writes 4n tokens. `<eos>` is banned in the free stages, so untrained weights
write exactly that many.

Strategies, each per stage, with `hierarchy` = the sum of the three stages:
  hiermt          `hiermt.decode.jitted`: the KV-cached while loop with every
                  segment of the piece in one batch; compiled ahead of time
                  (`compile_seconds`), run once to warm up, then timed.
  jax_uncached    `hiermt.decode.decode_uncached`, the official code's strategy
                  in JAX with the same model and parameters: every token
                  re-runs the whole sequence, one forward pass per note in
                  stages 2-3, one segment after another, with `<eos>` banned.
                  Segment 0 is run twice (the first run compiles a forward
                  pass per sequence length) and the second run timed; segments
                  are independent and sequential in this strategy, so the
                  piece costs `segments` x that (the JSON says so per stage).
  official_torch  the official PyTorch generation loops (official.py), cross
                  conditioning only (the official model), one call timed and
                  multiplied by the calls a piece needs (stage 1 decodes 15
                  segments per call, the others one).
Speed-ups are `official seconds / hiermt seconds` for the whole piece at the
same notes per segment. `--uncached_notes_per_segment` and
`--official_notes_per_segment` run the slow strategies on fewer notes; hiermt
is then measured at those counts as well, so every ratio compares equal work
and nothing is extrapolated.
"""

import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import base
from hiermt import decode
from hiermt import vocabulary as vocab
from hiermt.benchmark import official
from hiermt.models import decoder as decoder_lib
from hiermt.models import transcriber

STAGES = ("onset_pitch", "velocity", "offset", "flatten")
HIERARCHY = ("onset_pitch", "velocity", "offset")
# Random weights give near-uniform logits; scaling the head makes each choice
# decisive, so the cached and uncached arithmetic cannot pick different tokens.
HEAD_SCALE = 30.0


def model_config(stage, encoder, size, conditioning, options="", dtype="float32"):
  """configs/base.py's config of `stage` for an encoder, decoder size and conditioning, plus `options`,
  computing in `dtype` (`train.dtype`)."""
  arg = f"{stage},encoder={encoder},size={size},conditioning={conditioning}"
  config = base.get_config(f"{arg},{options}" if options else arg)
  config.train.dtype = dtype
  return config


def feature_shape(config):
  """(frames, d_enc) of the features `config`'s encoder gives for one 10 s segment."""
  encoder = transcriber.build_encoder(config)
  samples = int(round(config.data.segment_seconds * config.data.sample_rate))
  audio = jax.ShapeDtypeStruct((1, samples), jnp.float32)
  variables = jax.eval_shape(functools.partial(encoder.init, train=False), jax.random.key(0), audio)
  features = jax.eval_shape(lambda v, a: encoder.apply(v, a, train=False)["features"], variables, audio)
  return features.shape[1], features.shape[2]


def segment_notes(count, seed=0):
  """One segment's `count` notes: onsets (10 ms steps, spread over [0, 1000)) and piano pitches, int arrays."""
  if count > vocab.SEGMENT_STEPS:
    raise ValueError(f"at most {vocab.SEGMENT_STEPS} notes per segment, got {count}")
  onsets = np.linspace(0, vocab.SEGMENT_STEPS - 1, count).astype(np.int64)  # distinct: count <= 1000
  pitches = np.random.default_rng(seed).integers(decode.LOWEST_PIANO_PITCH, decode.HIGHEST_PIANO_PITCH + 1, count)
  return onsets, pitches


def _random_params(config, frames, dim):
  """Random decoder parameters `{"decoder": ...}` for `config` (the encoder's are never used here)."""
  decoder = transcriber.build_decoder(config)
  tokens = jnp.zeros((1, 4), jnp.int32)
  features = jnp.zeros((1, frames, dim), jnp.float32)
  # Init runs once: without XLA's backend optimisations it compiles much faster.
  init = jax.jit(decoder.init).lower(jax.random.key(config.seed), tokens, features).compile(
      compiler_options={"xla_backend_optimization_level": 0})
  params = init(jax.random.key(config.seed), tokens, features)["params"]
  params["head"] = jax.tree.map(lambda x: x * HEAD_SCALE, params["head"])
  return {"decoder": params}


def _inputs(segments, notes):
  """Forced-stage inputs, the same notes in every segment: (on, pitch int32 [segments, notes], count [segments])."""
  onsets, pitches = segment_notes(notes)
  on = np.tile(vocab.time_id(onsets).astype(np.int32), (segments, 1))
  pitch = np.tile(vocab.pitch_id(pitches).astype(np.int32), (segments, 1))
  return on, pitch, np.full(segments, notes, np.int32)


def _check_room(stage, config, notes):
  """Raises ValueError when `notes` per segment do not fit the stage's token budget (config.data.max_tokens)."""
  needed = 2 + len(vocab.LAYOUTS[stage]) * notes
  if needed > config.data.max_tokens:
    raise ValueError(f"{notes} notes per segment need {needed} {stage} tokens, more than its "
                     f"data.max_tokens={config.data.max_tokens}; lower --notes_per_second")


def time_hiermt(model, stage, config, params, features, notes, repeats=1):
  """hiermt's cached loop over every segment at once: (report, tokens or answers of segment 0).

  Args:
    model: the stage's Transcriber.
    stage: a decoding stage.
    config: its config (for max_tokens).
    params: `{"decoder": ...}`.
    features: [segments, frames, d_enc].
    notes: notes per segment.
    repeats: timed runs after the warm-up run (median reported).
  """
  _check_room(stage, config, notes)
  segments = features.shape[0]
  if stage in decode.FREE_STAGES:
    max_len = 2 + len(vocab.LAYOUTS[stage]) * notes
    fn = decode.jitted(model, stage, max_len, stop_at_eos=False)
    args = (params, features)
    work = {"tokens_per_segment": max_len - 2}
  else:
    fn = decode.jitted(model, stage, config.data.max_tokens)
    args = (params, features) + _inputs(segments, notes)
    work = {"notes_per_segment": notes}
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_seconds = time.perf_counter() - start
  out = jax.block_until_ready(compiled(*args))  # warm-up
  runs = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    runs.append(time.perf_counter() - start)
  report = dict(work, batch=segments, compile_seconds=round(compile_seconds, 3),
                piece_seconds=round(float(np.median(runs)), 4), run_seconds=[round(t, 4) for t in runs],
                measured=f"all {segments} segments in one batch")
  return report, np.asarray(_written(stage, out)[0])


def _written(stage, out):
  """The tokens (free stages, which also return probabilities) or answers of a decoding run."""
  return out[0] if stage in decode.FREE_STAGES else out


def time_uncached(model, stage, config, params, features, notes):
  """The official strategy in JAX on segment 0: (report, tokens or answers of segment 0).

  Args as `time_hiermt`; only `features[:1]` is decoded. The segment is run
  twice and the second run timed; `piece_seconds` is that times the piece's
  segments (independent, decoded one after another in this strategy).
  """
  _check_room(stage, config, notes)
  segments = features.shape[0]
  first = np.asarray(features[:1])  # [1, frames, d_enc]
  if stage in decode.FREE_STAGES:
    max_len = 2 + len(vocab.LAYOUTS[stage]) * notes
    args = (model, stage, max_len, params, first)
    work = {"tokens_per_segment": max_len - 2, "forward_passes_per_segment": max_len - 2}
  else:
    args = (model, stage, config.data.max_tokens, params, first) + _inputs(1, notes)
    work = {"notes_per_segment": notes, "forward_passes_per_segment": notes}
  start = time.perf_counter()
  decode.decode_uncached(*args, stop_at_eos=False)
  warmup = time.perf_counter() - start
  start = time.perf_counter()
  out = decode.decode_uncached(*args, stop_at_eos=False)
  seconds = time.perf_counter() - start
  report = dict(work, measured_segments=1, warmup_seconds=round(warmup, 3), measured_seconds=round(seconds, 3),
                multiplied_by=segments, piece_seconds=round(seconds * segments, 3),
                measured=f"segment 0 alone (second run; the first compiled a forward pass per length), "
                         f"x {segments} segments")
  return report, _written(stage, out)[0]


def _piece_totals(stages: dict) -> dict:
  """`hierarchy` and `flatten` piece seconds and their ratio, from per-stage reports."""
  totals = {"hierarchy": round(sum(stages[s]["piece_seconds"] for s in HIERARCHY), 4),
            "flatten": stages["flatten"]["piece_seconds"]}
  totals["hierarchy_over_flatten"] = round(totals["hierarchy"] / totals["flatten"], 4)
  return totals


def _speedups(slow: dict, fast: dict) -> dict:
  """slow / fast piece seconds per stage and for the hierarchy."""
  out = {s: round(slow[s]["piece_seconds"] / fast[s]["piece_seconds"], 2) for s in STAGES}
  out["hierarchy"] = round(slow["totals"]["hierarchy"] / fast["totals"]["hierarchy"], 2)
  return out


def _official_torch(size, encoder, frames, dim, segments, notes, official_repo, torch_python, threads):
  """The official PyTorch loops at `notes` per segment, per stage with piece totals."""
  onsets, pitches = segment_notes(notes)
  measured = official.decode_official(official_repo, size, encoder, frames, dim, onsets, pitches, STAGES,
                                      torch_python, threads)
  report = {k: v for k, v in measured.items() if k not in STAGES}
  for stage in STAGES:
    call = dict(measured[stage])
    seconds = call.pop("seconds")
    calls = math.ceil(segments / call["segments_per_call"])
    report[stage] = dict(call, measured_calls=1, measured_seconds=seconds, multiplied_by=calls,
                         piece_seconds=round(seconds * calls, 3),
                         measured=f"one call ({call['segments_per_call']} segment(s) of {notes} notes), "
                                  f"x {calls} call(s) per piece")
  report["totals"] = _piece_totals(report)
  return report


def decode_report(sizes, conditionings, encoder="crnn", piece_seconds=60.0, notes_per_second=20.0, options="",
                  uncached_notes=None, official_notes=None, official_repo="", torch_python=None, threads=2,
                  repeats=1, dtype="float32") -> dict:
  """Per-stage and per-piece decoding seconds of every strategy (module docstring), as a JSON-ready dict.

  Args:
    sizes: decoder sizes (configs/base.py DECODER_SIZES).
    conditionings: "prefix" and/or "cross".
    encoder: "crnn" or "hppnet": the features' frame count and width.
    piece_seconds: length of the piece (segments = ceil(piece_seconds / 10)).
    notes_per_second: note density; n = round(10 x notes_per_second) notes per segment.
    options: extra configs/base.py options (e.g. "runlocal").
    uncached_notes: notes per segment for jax_uncached (None: n; 0: skip it).
    official_notes: notes per segment for official_torch (None: n; 0: skip it).
    official_repo: checkout of the official code; empty skips official_torch.
    torch_python: Python with torch for the official side (None: this one).
    threads: CPUs the official side is pinned to.
    repeats: timed runs of each cached loop after its warm-up run.
    dtype: hiermt's compute dtype ("bfloat16": weights and caches in bfloat16 while decoding).

  Raises:
    ValueError: a size, conditioning or note count that does not fit.
  """
  segments = math.ceil(piece_seconds / vocab.SEGMENT_SECONDS)
  notes = round(notes_per_second * vocab.SEGMENT_SECONDS)
  uncached_notes = notes if uncached_notes is None else uncached_notes
  official_notes = notes if official_notes is None else official_notes
  if segments < 1 or notes < 1 or min(uncached_notes, official_notes) < 0:
    raise ValueError(f"need a positive piece length and note counts, got piece_seconds={piece_seconds}, "
                     f"{notes} notes, uncached {uncached_notes}, official {official_notes}")
  for size in sizes:
    if size not in base.DECODER_SIZES:
      raise ValueError(f"unknown decoder size {size!r}; valid: {', '.join(base.DECODER_SIZES)}")
  for conditioning in conditionings:
    if conditioning not in base.CONDITIONINGS:
      raise ValueError(f"unknown conditioning {conditioning!r}; valid: {', '.join(base.CONDITIONINGS)}")
  frames, dim = feature_shape(model_config("onset_pitch", encoder, "nano", "prefix", options))
  features = jax.random.normal(jax.random.key(1), (segments, frames, dim))  # [segments, frames, d_enc]
  counts = sorted({notes, uncached_notes, official_notes} - {0})
  report = {
      "setup": {"encoder": encoder, "options": options, "dtype": dtype, "frames": frames, "feature_dim": dim,
                "piece_seconds": piece_seconds, "segments": segments, "notes_per_second": notes_per_second,
                "notes_per_segment": notes, "uncached_notes_per_segment": uncached_notes,
                "official_notes_per_segment": official_notes if official_repo else 0,
                "device": jax.devices()[0].device_kind, "cpus": len(os.sched_getaffinity(0)),
                "load_average_1min_before": round(os.getloadavg()[0], 2),
                "work": "per segment: onset_pitch writes 2n tokens, velocity and offset answer n given notes, "
                        "flatten writes 4n tokens; <eos> banned; random weights and features",
                "official_torch": "cross conditioning only (the official EncDecPos); stage 1 decodes 15 "
                                  "segments per call, the last call zero-padded, as the official script"},
      "decoders": {}}
  for stage in STAGES:  # token budgets do not depend on size or conditioning: fail before compiling anything
    for count in counts:
      _check_room(stage, model_config(stage, encoder, "nano", "prefix", options), count)
  for size in sizes:
    for conditioning in conditionings:
      configs = {s: model_config(s, encoder, size, conditioning, options, dtype) for s in STAGES}
      models = {s: transcriber.build_model(c) for s, c in configs.items()}
      # The stages' decoders differ only in max_len, which holds no parameters: one set serves all.
      params = _random_params(configs["onset_pitch"], frames, dim)
      entry = {"params": decoder_lib.count_params(params["decoder"], exclude=()),
               "max_tokens": {s: c.data.max_tokens for s, c in configs.items()}}
      for count in counts:
        block = {"hiermt": {}}
        cached_tokens = {}
        for stage in STAGES:
          block["hiermt"][stage], cached_tokens[stage] = time_hiermt(
              models[stage], stage, configs[stage], params, features, count, repeats)
        block["hiermt"]["totals"] = _piece_totals(block["hiermt"])
        if count == uncached_notes:
          block["jax_uncached"] = {}
          for stage in STAGES:
            stage_report, tokens = time_uncached(models[stage], stage, configs[stage], params, features, count)
            stage_report["tokens_equal_hiermt_segment0"] = bool(np.array_equal(tokens, cached_tokens[stage]))
            block["jax_uncached"][stage] = stage_report
          block["jax_uncached"]["totals"] = _piece_totals(block["jax_uncached"])
          block["speedup_vs_jax_uncached"] = _speedups(block["jax_uncached"], block["hiermt"])
        if count == official_notes and official_repo and conditioning == "cross":
          block["official_torch"] = _official_torch(size, encoder, frames, dim, segments, count, official_repo,
                                                    torch_python, threads)
          block["speedup_vs_official_torch"] = _speedups(block["official_torch"], block["hiermt"])
        entry[f"notes_per_segment_{count}"] = block
      report["decoders"][f"{size},{conditioning}"] = entry
  report["setup"]["load_average_1min_after"] = round(os.getloadavg()[0], 2)
  return report
