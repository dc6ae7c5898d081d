"""Flags and dispatch of `python -m hiermt.benchmark` (modes: see the package docstring)."""

import json

from absl import app
from absl import flags

from configs import base
from hiermt import command_logging
from hiermt.benchmark import decode
from hiermt.benchmark import loader
from hiermt.benchmark import official
from hiermt.benchmark import params
from hiermt.benchmark import train
from hiermt.benchmark import transcription

FLAGS = flags.FLAGS
flags.DEFINE_string("what", None,
                    "what to measure: params | train_step | loader | train | accumulation | vs_official | decode | "
                    "transcribe")
flags.DEFINE_list("sizes", ["nano", "micro", "tiny"], "train_step/vs_official/decode: decoder sizes "
                  "(configs/base.py DECODER_SIZES)")
flags.DEFINE_enum("encoder", "crnn", base.ENCODERS, "train_step/decode: encoder whose features condition the "
                  "decoder; transcribe: the LM stages' and roll layout's encoder")
flags.DEFINE_integer("batch", 2, "train_step: examples per step")
flags.DEFINE_integer("tokens", 1024, "train_step: tokens per example")
flags.DEFINE_integer("steps", 2, "train_step: timed steps after one warm-up step; train, accumulation: steps "
                     "per round")
flags.DEFINE_integer("rounds", 5, "train: alternating rounds of in-memory and loader-fed steps; accumulation: "
                     "alternating rounds of the accumulation factors")
flags.DEFINE_list("accums", ["1", "2", "4"], "accumulation: train.grad_accum factors to time (1 is the reference)")
flags.DEFINE_list("stages", list(base.STAGES), "loader/train/accumulation: stages to measure")
flags.DEFINE_string("data_dir", "", "loader/train/accumulation: MAESTRO-layout corpus (empty: the generated "
                    "runlocal corpus)")
flags.DEFINE_integer("loader_batches", 100, "loader: timed batches after one warm-up batch")
flags.DEFINE_integer("loader_batch", 16, "loader: examples per batch")
flags.DEFINE_string("config_arg", "runlocal", "train, accumulation: options appended to STAGE for "
                    "configs/base.py")
flags.DEFINE_integer("workers", 1, "train: Grain worker processes feeding the timed loop")
flags.DEFINE_string("official_repo", "", "vs_official/decode: checkout of the official PyTorch repository "
                    "(decode: empty skips the official PyTorch side)")
flags.DEFINE_string("torch_python", "", "vs_official/decode: Python with torch for the official side "
                    "(empty: this one)")
flags.DEFINE_integer("threads", 2, "vs_official/decode: CPUs the official side (vs_official: each side) is pinned to")
flags.DEFINE_list("conditioning", list(base.CONDITIONINGS), "decode/transcribe: decoder conditionings to measure")
flags.DEFINE_string("model_options", "", "decode/transcribe: configs/base.py options appended to "
                    "STAGE,encoder=,size=,conditioning= (e.g. runlocal for tiny test models)")
flags.DEFINE_float("piece_seconds", 60.0, "decode: length of the piece (10 s segments)")
flags.DEFINE_float("notes_per_second", None, "decode: note density of the piece (default 20); transcribe: notes "
                   "per second stage 1 and flatten write (default 15)")
flags.DEFINE_integer("uncached_notes_per_segment", None, "decode: notes per segment for the official strategy "
                     "in JAX (default: the piece's; 0 skips it)")
flags.DEFINE_integer("official_notes_per_segment", None, "decode: notes per segment for the official PyTorch "
                     "code (default: the piece's; 0 skips it)")
flags.DEFINE_integer("repeats", 1, "decode: timed runs of each cached loop after its warm-up run (median)")
flags.DEFINE_list("layouts", ["hierarchy", "flatten", "roll"], "transcribe: layouts to time")
flags.DEFINE_string("size", "tiny", "transcribe: decoder size of the LM stages")
flags.DEFINE_float("audio_seconds", 60.0, "transcribe: length of the generated audio file")
flags.DEFINE_integer("batch_segments", 8, "transcribe: segments per batch (transcribe.load; also the batch of "
                     "the encoder-only timing)")
flags.DEFINE_list("encoders", list(base.ENCODERS), "transcribe: encoders whose forward pass alone is timed "
                  "(empty: none)")

flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "decode/transcribe: hiermt's compute dtype "
                  "(bfloat16: weights and caches in bfloat16 while decoding)")

DECODE_NOTES_PER_SECOND = 20.0
TRANSCRIBE_NOTES_PER_SECOND = 15.0


def _check_sizes(sizes):
  unknown = [s for s in sizes if s not in base.DECODER_SIZES]
  if unknown:
    raise app.UsageError(f"unknown decoder size(s) {', '.join(unknown)}; valid: {', '.join(base.DECODER_SIZES)}")


def _decode():
  nps = DECODE_NOTES_PER_SECOND if FLAGS.notes_per_second is None else FLAGS.notes_per_second
  return decode.decode_report(
      FLAGS.sizes, FLAGS.conditioning, FLAGS.encoder, FLAGS.piece_seconds, nps, FLAGS.model_options,
      FLAGS.uncached_notes_per_segment, FLAGS.official_notes_per_segment, FLAGS.official_repo,
      FLAGS.torch_python or None, FLAGS.threads, FLAGS.repeats, FLAGS.dtype)


def _transcribe():
  nps = TRANSCRIBE_NOTES_PER_SECOND if FLAGS.notes_per_second is None else FLAGS.notes_per_second
  return transcription.transcribe_report(
      FLAGS.layouts, FLAGS.encoder, FLAGS.size, FLAGS.conditioning, FLAGS.audio_seconds, nps,
      FLAGS.batch_segments, FLAGS.model_options, FLAGS.encoders, FLAGS.dtype)


MODES = {
    "params": params.params_report,
    "train_step": lambda: train.train_step_report(FLAGS.sizes, FLAGS.encoder, FLAGS.batch, FLAGS.tokens,
                                                  FLAGS.steps),
    "loader": lambda: loader.loader_report(FLAGS.stages, FLAGS.loader_batches, FLAGS.loader_batch, FLAGS.data_dir),
    "train": lambda: train.train_report(FLAGS.stages, FLAGS.config_arg, FLAGS.steps, FLAGS.rounds, FLAGS.workers,
                                        FLAGS.data_dir),
    "accumulation": lambda: train.accumulation_report(FLAGS.stages, FLAGS.config_arg, [int(k) for k in FLAGS.accums],
                                                      FLAGS.steps, FLAGS.rounds, FLAGS.data_dir),
    "vs_official": lambda: {size: official.compare(FLAGS.official_repo, size, FLAGS.batch, FLAGS.tokens,
                                                   FLAGS.steps, FLAGS.torch_python or None, FLAGS.threads)
                            for size in FLAGS.sizes},
    "decode": _decode,
    "transcribe": _transcribe,
}
# Modes that read --sizes, checked before anything slow starts.
_SIZED = ("train_step", "vs_official", "decode")


def main(argv):
  """Prints the JSON report of `--what`."""
  command_logging.hiermt_info_only()
  del argv
  if FLAGS.what not in MODES:
    raise app.UsageError(f"--what must be one of {', '.join(MODES)}, got {FLAGS.what!r}")
  if FLAGS.what in _SIZED:
    _check_sizes(FLAGS.sizes)
  print(json.dumps(MODES[FLAGS.what](), indent=2))
