"""Model measurements, printed as JSON.

  python -m hiermt.benchmark --what=params
      Parameter counts of both encoders and every decoder size (the decoder's
      audio projection excluded), and forward FLOPs per 10 s segment.
  python -m hiermt.benchmark --what=train_step [--sizes=nano,micro,tiny] [--encoder=crnn]
      Forward + backward wall time per example of the decoder on this machine.
  python -m hiermt.benchmark --what=loader [--stages=...] [--data_dir=DIR]
      Examples/s of the Grain pipeline from one worker (in-process), per stage.
  python -m hiermt.benchmark --what=train [--stages=...] [--config_arg=runlocal] [--steps=4 --rounds=5]
      Whole train steps (encoder + decoder, sharded, jitted) fed by the real
      loader and by one in-memory batch, in alternating rounds: median step
      times, loader overhead, examples/s, tokens/s.
  python -m hiermt.benchmark --what=vs_official --official_repo=DIR [--torch_python=PY] [--sizes=tiny,base]
      The official PyTorch decoder training step and ours at equal configuration,
      one after the other in one run (see hiermt/official_compare.py).

Shapes come from `jax.eval_shape` / `jax.make_jaxpr`, so `params` allocates no
weights and finishes in seconds even for the large sizes.
"""

if __name__ == "__main__":
  # First, so the heavy imports below happen only in the process that stays.
  from hiermt import allocator
  allocator.use_tcmalloc()

import json
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import optax

from configs import base
from hiermt import flops
from hiermt import official_compare
from hiermt import partitioning
from hiermt import train
from hiermt import vocabulary
from hiermt.data import pipeline
from hiermt.models import decoder as decoder_lib
from hiermt.models import transcriber

FLAGS = flags.FLAGS
flags.DEFINE_string("what", None, "what to measure: params | train_step | loader | train | vs_official")
flags.DEFINE_list("sizes", ["nano", "micro", "tiny"], "train_step: decoder sizes (configs/base.py DECODER_SIZES)")
flags.DEFINE_enum("encoder", "crnn", base.ENCODERS, "train_step: encoder whose features form the prefix")
flags.DEFINE_integer("batch", 2, "train_step: examples per step")
flags.DEFINE_integer("tokens", 1024, "train_step: tokens per example")
flags.DEFINE_integer("steps", 2, "train_step: timed steps after one warm-up step; train: steps per round")
flags.DEFINE_integer("rounds", 5, "train: alternating rounds of in-memory and loader-fed steps")
flags.DEFINE_list("stages", list(base.STAGES), "loader/train: stages to measure")
flags.DEFINE_string("data_dir", "", "loader/train: MAESTRO-layout corpus (empty: the generated runlocal corpus)")
flags.DEFINE_integer("loader_batches", 100, "loader: timed batches after one warm-up batch")
flags.DEFINE_integer("loader_batch", 16, "loader: examples per batch")
flags.DEFINE_string("config_arg", "runlocal", "train: options appended to STAGE for configs/base.py")
flags.DEFINE_integer("workers", 1, "train: Grain worker processes feeding the timed loop")
flags.DEFINE_string("official_repo", "", "vs_official: checkout of the official PyTorch repository")
flags.DEFINE_string("torch_python", "", "vs_official: Python with torch for the official side (empty: this one)")
flags.DEFINE_integer("threads", 2, "vs_official: CPUs each side is pinned to")

# FLOPs are quoted for the onset stage's longest sequence.
FLOPS_TOKENS = 1024


def _segment_audio(batch=1):
  """Abstract audio of one 10 s segment, `[batch, samples]`."""
  config = base.get_config("encoder")
  samples = int(round(config.data.segment_seconds * config.data.sample_rate))
  return jax.ShapeDtypeStruct((batch, samples), jnp.float32)


def _encoder(name):
  return transcriber.build_encoder(base.get_config(f"encoder,encoder={name}"))


def _decoder(size, conditioning="prefix", max_len=FLOPS_TOKENS):
  layers, heads, dim, _ = base.DECODER_SIZES[size]
  return decoder_lib.Decoder(vocabulary.VOCAB_SIZE, layers, heads, dim, max_len=max_len, conditioning=conditioning)


def params_report() -> dict:
  """Parameter counts and forward FLOPs per 10 s segment, as a JSON-ready dict."""
  key = jax.random.key(0)
  audio = _segment_audio()
  report = {"encoder": {}, "decoder": {c: {} for c in base.CONDITIONINGS},
            "flops": {"encoder": {}, "decoder": {}}, "encoder_features": {}}
  for name in base.ENCODERS:
    encoder = _encoder(name)
    variables = jax.eval_shape(lambda k, a, e=encoder: e.init(k, a, train=False), key, audio)
    report["encoder"][name] = decoder_lib.count_params(variables["params"], exclude=())
    apply = lambda v, a, e=encoder: e.apply(v, a, train=False)["features"]  # noqa: E731
    forward, features = jax.make_jaxpr(apply, return_shape=True)(variables, audio)  # features [1, frames, d_enc]
    report["encoder_features"][name] = {"frames": features.shape[1], "dim": features.shape[2]}
    report["flops"]["encoder"][name] = flops.matmul_flops(forward)
    report["flops"]["decoder"][name] = {}
    tokens = jax.ShapeDtypeStruct((1, FLOPS_TOKENS), jnp.int32)
    for size in base.DECODER_SIZES:
      decoder = _decoder(size)
      variables = jax.eval_shape(decoder.init, key, tokens, features)
      forward = jax.make_jaxpr(decoder.apply)(variables, tokens, features)
      report["flops"]["decoder"][name][size] = flops.matmul_flops(forward)
      report["decoder"]["prefix"][size] = decoder_lib.count_params(variables["params"])

  for size in base.DECODER_SIZES:
    variables = jax.eval_shape(_decoder(size, "cross").init, key, jax.ShapeDtypeStruct((1, 4), jnp.int32),
                               jax.ShapeDtypeStruct((1, 4, 1536), jnp.float32))
    report["decoder"]["cross"][size] = decoder_lib.count_params(variables["params"])

  report["assumptions"] = {
      "vocab_size": vocabulary.VOCAB_SIZE,
      "encoder_width": 1.0,
      "decoder_params": "audio projection (audio_proj) excluded",
      "flops": "forward, batch 1, one 10 s segment; 2 x multiply-adds of matmuls and convolutions "
               "(loops unrolled by trip count; element-wise ops and FFTs excluded)",
      "decoder_flops": f"prefix conditioning, prefix = the encoder's frames (no pooling), {FLOPS_TOKENS} tokens",
  }
  return report


def train_step_report(sizes, encoder="crnn", batch=2, tokens=1024, steps=2) -> dict:
  """Decoder forward + backward wall time per example for each size, on the default device.

  The encoder is left out: its features are random inputs of the encoder's
  10 s shape, so only the decoder (and its audio projection) trains.
  """
  enc = _encoder(encoder)
  variables = jax.eval_shape(lambda k, a: enc.init(k, a, train=False), jax.random.key(0), _segment_audio())
  features = jax.eval_shape(lambda v, a: enc.apply(v, a, train=False)["features"], variables, _segment_audio())
  k_audio, k_tokens, k_init = jax.random.split(jax.random.key(0), 3)
  audio = jax.random.normal(k_audio, (batch,) + features.shape[1:])
  token_ids = jax.random.randint(k_tokens, (batch, tokens), 0, vocabulary.VOCAB_SIZE)
  report = {"device": jax.devices()[0].device_kind, "encoder": encoder, "prefix_frames": features.shape[1],
            "batch": batch, "tokens": tokens, "timed_steps": steps, "dtype": "float32",
            "compile_seconds": {}, "seconds_per_example": {}}
  for size in sizes:
    if size not in base.DECODER_SIZES:
      raise app.UsageError(f"unknown decoder size {size!r}; valid: {', '.join(base.DECODER_SIZES)}")
    decoder = _decoder(size, max_len=tokens)
    params = jax.jit(decoder.init)(k_init, token_ids, audio)["params"]

    def loss(p, decoder=decoder):
      logits = decoder.apply({"params": p}, token_ids, audio)  # [batch, tokens, vocab]
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], token_ids[:, 1:]).mean()

    step = jax.jit(jax.value_and_grad(loss))
    start = time.perf_counter()
    jax.block_until_ready(step(params))  # compile + warm-up
    report["compile_seconds"][size] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    for _ in range(steps):
      jax.block_until_ready(step(params))
    report["seconds_per_example"][size] = round((time.perf_counter() - start) / (steps * batch), 4)
  return report


def _stage_config(stage, options, data_dir):
  config = base.get_config(f"{stage},{options}" if options else stage)
  config.data.data_dir = data_dir
  if not data_dir:  # the small generated corpus; loader speed does not depend on corpus size
    config.data.generated_minutes = base.get_config(f"{stage},runlocal").data.generated_minutes
  return config


def loader_report(stages, batches, batch, data_dir="") -> dict:
  """Examples/s of the input pipeline (in-process, i.e. one worker), per stage, at paper token lengths."""
  report = {"batch": batch, "timed_batches": batches, "examples_per_s": {}, "max_tokens": {}}
  for stage in stages:
    config = _stage_config(stage, "", data_dir)
    config.data.worker_count = 0
    config.train.batch_size = batch
    it = iter(pipeline.make_dataset(config, config.data.train_split, seed=0))
    next(it)  # opens memory maps, caches notes
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    report["examples_per_s"][stage] = round(batches * batch / (time.perf_counter() - start), 1)
    report["max_tokens"][stage] = config.data.max_tokens
  return report


def train_report(stages, options, steps, rounds, workers, data_dir="") -> dict:
  """Train-step time with the real loader vs. one batch held in memory, per stage.

  The two feeds alternate, `rounds` times `steps` steps each, and each side's
  per-step time is the median over its rounds: a slow spell of a shared
  machine then lands on both sides instead of biasing one.
  `loader_wait_fraction` is the share of the loader-fed steps' wall time the
  loop spent blocked in `next()`, i.e. waiting for data; it does not move with
  the machine's load the way step times do.
  """
  report = {"devices": jax.device_count(), "device": jax.devices()[0].device_kind, "options": options,
            "steps_per_round": steps, "rounds": rounds, "loader_workers": workers, "stages": {}}
  for stage in stages:
    config = _stage_config(stage, options, data_dir)
    config.data.worker_count = workers
    if stage != "encoder":
      config.init_from = "none"
    c = train.compile_steps(config)
    it = iter(pipeline.make_dataset(config, config.data.train_split, seed=0))
    host = next(it)
    host.pop("truncated", None)
    tokens = float(host["loss_mask"].sum()) if "loss_mask" in host else 0.0
    fixed = partitioning.global_batch(c.mesh, host)
    state, metrics = c.train_fn(c.state, fixed, c.step_rng)  # compile + warm-up
    jax.block_until_ready(metrics)

    def timed(next_batch, state):
      start = time.perf_counter()
      for _ in range(steps):
        state, metrics = c.train_fn(state, next_batch(), c.step_rng)
      jax.block_until_ready(metrics)
      return (time.perf_counter() - start) / steps, state

    waits = []  # seconds the loop spent blocked on the loader, per loader-fed step

    def from_loader():
      start = time.perf_counter()
      batch = next(it)
      waits.append(time.perf_counter() - start)
      batch.pop("truncated", None)
      return partitioning.global_batch(c.mesh, batch)

    rounds_in_memory, rounds_loader = [], []
    for _ in range(rounds):
      seconds, state = timed(lambda: fixed, state)
      rounds_in_memory.append(seconds)
      seconds, state = timed(from_loader, state)
      rounds_loader.append(seconds)
    in_memory, loader = statistics.median(rounds_in_memory), statistics.median(rounds_loader)
    report["stages"][stage] = {
        "decoder": None if stage == "encoder" else config.decoder.size, "encoder": config.encoder.name,
        "batch": config.train.batch_size, "step_s_in_memory": round(in_memory, 4), "step_s_loader": round(loader, 4),
        "loader_overhead": round(loader / in_memory - 1.0, 4),
        "loader_wait_fraction": round(sum(waits) / (sum(rounds_loader) * steps), 4),
        "round_step_s_in_memory": [round(t, 4) for t in rounds_in_memory],
        "round_step_s_loader": [round(t, 4) for t in rounds_loader],
        "examples_per_s": round(config.train.batch_size / loader, 3),
        "tokens_per_s": round(tokens / loader, 1) if tokens else None}
  return report


MODES = {
    "params": params_report,
    "train_step": lambda: train_step_report(FLAGS.sizes, FLAGS.encoder, FLAGS.batch, FLAGS.tokens, FLAGS.steps),
    "loader": lambda: loader_report(FLAGS.stages, FLAGS.loader_batches, FLAGS.loader_batch, FLAGS.data_dir),
    "train": lambda: train_report(FLAGS.stages, FLAGS.config_arg, FLAGS.steps, FLAGS.rounds, FLAGS.workers,
                                     FLAGS.data_dir),
    "vs_official": lambda: {size: official_compare.compare(FLAGS.official_repo, size, FLAGS.batch, FLAGS.tokens,
                                                           FLAGS.steps, FLAGS.torch_python or None, FLAGS.threads)
                            for size in FLAGS.sizes},
}


def main(argv):
  del argv
  if FLAGS.what not in MODES:
    raise app.UsageError(f"--what must be one of {', '.join(MODES)}, got {FLAGS.what!r}")
  print(json.dumps(MODES[FLAGS.what](), indent=2))


if __name__ == "__main__":
  app.run(main)
