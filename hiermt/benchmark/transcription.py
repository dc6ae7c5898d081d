"""`--what=transcribe`: whole-file transcription time with random-weight stages, and the encoders alone.

Audio file in, MIDI file out, through `transcribe.load(...).transcribe(path)`
and `notes.write_midi`: the encoder of every stage and all decoding, stitching
and file I/O. The stages come from a temporary workdir of random-weight
checkpoints (`checkpoint.write_stage`), the audio is a generated dense
piano-like WAV (any audio times the same with random weights), and
`fixed_tokens` makes stage 1 and flatten write exactly `notes_per_second` x 10
notes' worth of tokens per segment, as a trained model on a dense piece would.
Each layout is loaded once and run twice on the file: the first call compiles
every program, the second is the steady state the real-time factor is taken
from. Peak RSS is the process's so far (layouts run one after another).

The encoders' forward pass alone (jitted, `batch_segments` segments at once)
is timed too: it is the floor every layout pays, once per stage.
"""

import functools
import math
import os
import resource
import tempfile
import time

import jax
import numpy as np
import optax
import soundfile

from configs import base
from hiermt import audio as audio_lib
from hiermt import checkpoint
from hiermt import notes as notes_lib
from hiermt import partitioning
from hiermt import train
from hiermt import transcribe
from hiermt import vocabulary as vocab
from hiermt.benchmark import decode as decode_bench
from hiermt.models import transcriber

# The free-running stage whose token count `fixed_tokens` sets, per layout.
_FREE_STAGE = {"hierarchy": "onset_pitch", "flatten": "flatten"}


def _peak_rss_gib() -> float:
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # ru_maxrss is in KiB


def dense_audio(seconds, notes_per_second, seed=0):
  """Piano-like test audio: float32 [samples] at 16 kHz of random decaying harmonic tones.

  `seconds * notes_per_second` notes with random onsets, pitches (A0-C8),
  durations (0.2-1 s) and loudness, normalised to a 0.9 peak.
  """
  rng = np.random.default_rng(seed)
  rate = audio_lib.SAMPLE_RATE
  out = np.zeros(int(seconds * rate), np.float64)
  for _ in range(int(round(seconds * notes_per_second))):
    start = int(rng.uniform(0, seconds) * rate)
    t = np.arange(min(int(rng.uniform(0.2, 1.0) * rate), len(out) - start)) / rate  # [note samples]
    frequency = 440.0 * 2 ** ((rng.integers(21, 109) - 69) / 12)
    harmonics = [np.sin(2 * np.pi * h * frequency * t) / h for h in (1, 2, 3) if h * frequency < rate / 2]
    out[start:start + len(t)] += rng.uniform(0.2, 1.0) * np.exp(-3.0 * t) * np.sum(harmonics, axis=0)
  return (0.9 * out / max(np.abs(out).max(), 1e-9)).astype(np.float32)


def write_random_stages(workdir, stages, encoder, size, conditioning, options=""):
  """Writes a random-weight checkpoint and config.json for each stage into WORKDIR/STAGE; returns the configs."""
  configs = {}
  mesh = partitioning.make_mesh(1, jax.devices()[:1])
  for stage in stages:
    config = decode_bench.model_config(stage, encoder, size, conditioning, options)
    # No optimizer state: transcription reads params and batch statistics only.
    state, _ = train.create_state(transcriber.build_model(config), config, optax.identity(), mesh,
                                  jax.random.key(config.seed))
    checkpoint.write_stage(checkpoint.stage_dir(workdir, stage), config, state)
    configs[stage] = config
  return configs


def time_encoders(encoders, batch, options=""):
  """Seconds of each encoder's jitted forward pass over `batch` random 10 s segments, and the real-time factor."""
  report = {}
  for name in encoders:
    config = base.get_config(f"encoder,encoder={name},{options}" if options else f"encoder,encoder={name}")
    encoder = transcriber.build_encoder(config)
    samples = int(round(config.data.segment_seconds * config.data.sample_rate))
    audio = 0.1 * jax.random.normal(jax.random.key(1), (batch, samples))  # [batch, samples]
    init = jax.jit(functools.partial(encoder.init, train=False)).lower(jax.random.key(0), audio[:1]).compile(
        compiler_options={"xla_backend_optimization_level": 0})  # runs once
    variables = init(jax.random.key(0), audio[:1])
    forward = jax.jit(lambda v, a, e=encoder: e.apply(v, a, train=False)["features"])
    start = time.perf_counter()
    compiled = forward.lower(variables, audio).compile()
    compile_seconds = time.perf_counter() - start
    jax.block_until_ready(compiled(variables, audio))  # warm-up
    start = time.perf_counter()
    jax.block_until_ready(compiled(variables, audio))
    seconds = time.perf_counter() - start
    report[name] = {"width": config.encoder.width, "batch_segments": batch,
                    "compile_seconds": round(compile_seconds, 3), "seconds": round(seconds, 3),
                    "real_time_factor": round(batch * config.data.segment_seconds / seconds, 2)}
  return report


def _fixed_tokens(layout, configs, notes):
  """Tokens per segment that make the layout's free stage write `notes` notes (None for roll)."""
  if layout not in _FREE_STAGE:
    return None
  stage = _FREE_STAGE[layout]
  tokens = 2 + len(vocab.LAYOUTS[stage]) * notes
  if tokens > configs[stage].data.max_tokens:
    raise ValueError(f"{notes} notes per segment need {tokens} {stage} tokens, more than its "
                     f"data.max_tokens={configs[stage].data.max_tokens}; lower --notes_per_second")
  return tokens


def time_layout(workdir, layout, path, batch_segments, fixed_tokens, audio_seconds, midi_path, dtype=None):
  """Load, first-call and steady-state seconds of one layout on the audio file `path` (`dtype`: see
  `transcribe.load`)."""
  start = time.perf_counter()
  model = transcribe.load(workdir, layout, batch_segments, fixed_tokens, dtype=dtype)
  load_seconds = time.perf_counter() - start
  calls = []
  for _ in range(2):
    start = time.perf_counter()
    notes = model.transcribe(path)
    notes_lib.write_midi(notes, midi_path)
    calls.append(time.perf_counter() - start)
  segments = math.ceil(audio_seconds / vocab.SEGMENT_SECONDS)
  report = {"batch_segments": batch_segments, "fixed_tokens": fixed_tokens, "load_seconds": round(load_seconds, 3),
            "first_call_seconds": round(calls[0], 3), "steady_seconds": round(calls[1], 3),
            "real_time_factor": round(audio_seconds / calls[1], 3), "notes_written": len(notes),
            "notes_per_segment_written": round(len(notes) / segments, 1), "peak_rss_gib_so_far": _peak_rss_gib()}
  if layout == "hierarchy":
    report["offset_chain"] = [{"rounds": r, "decoded_segments": d, "segments": s} for r, d, s in model.last_chain]
  return report


def transcribe_report(layouts, encoder="crnn", size="tiny", conditionings=("prefix",), audio_seconds=60.0,
                      notes_per_second=15.0, batch_segments=8, options="", encoders=base.ENCODERS,
                      dtype=None) -> dict:
  """Whole-file transcription timings per layout (and conditioning), plus the encoders alone, as a JSON-ready dict.

  Args:
    layouts: of transcribe.LAYOUTS; roll runs once, the LM layouts once per conditioning.
    encoder: the stages' encoder (crnn | hppnet).
    size: decoder size of the LM stages.
    conditionings: decoder conditionings of the LM stages.
    audio_seconds: length of the generated audio.
    notes_per_second: notes stage 1 and flatten write per second of audio.
    batch_segments: transcribe.load's batch; also the encoder-only batch.
    options: extra configs/base.py options (e.g. "runlocal").
    encoders: encoders whose forward pass alone is timed.
    dtype: compute dtype of the transcription (`transcribe.load`; None: float32, as trained).

  Raises:
    ValueError: an unknown layout, or a density the stage's token budget cannot hold.
  """
  unknown = [layout for layout in layouts if layout not in transcribe.LAYOUTS]
  if unknown:
    raise ValueError(f"unknown layout(s) {', '.join(unknown)}; valid: {', '.join(transcribe.LAYOUTS)}")
  notes = round(notes_per_second * vocab.SEGMENT_SECONDS)
  report = {"setup": {"encoder": encoder, "size": size, "options": options, "dtype": dtype or "float32",
                      "audio_seconds": audio_seconds,
                      "segments": math.ceil(audio_seconds / vocab.SEGMENT_SECONDS),
                      "notes_per_second": notes_per_second, "batch_segments": batch_segments,
                      "cpus": len(os.sched_getaffinity(0)), "device": jax.devices()[0].device_kind,
                      "load_average_1min_before": round(os.getloadavg()[0], 2),
                      "steady_seconds": "second transcribe(path) + write_midi call: audio read to MIDI written",
                      "first_call_seconds": "the first such call, compiling every program"},
            "encoder_only": time_encoders(encoders, batch_segments, options), "layouts": {}}
  runs = [(layout, None) for layout in layouts if layout == "roll"]
  runs += [(layout, c) for c in conditionings for layout in layouts if layout != "roll"]
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "dense.wav")
    soundfile.write(path, dense_audio(audio_seconds, notes_per_second), audio_lib.SAMPLE_RATE)
    for layout, conditioning in runs:
      workdir = os.path.join(tmp, conditioning or "roll")
      start = time.perf_counter()
      configs = write_random_stages(workdir, transcribe.LAYOUTS[layout], encoder, size, conditioning or "prefix",
                                    options)
      entry = {"stages": list(configs), "encoder_width": next(iter(configs.values())).encoder.width,
               "write_stages_seconds": round(time.perf_counter() - start, 3)}
      entry.update(time_layout(workdir, layout, path, batch_segments, _fixed_tokens(layout, configs, notes),
                               audio_seconds, os.path.join(tmp, "dense.mid"), dtype))
      report["layouts"][f"{layout},{conditioning}" if conditioning else layout] = entry
  report["setup"]["load_average_1min_after"] = round(os.getloadavg()[0], 2)
  return report
