"""`--what=train_step` (the decoder's forward + backward alone) and `--what=train` (whole train steps)."""

import statistics
import time

from absl import logging
import jax
import optax

from configs import base
from hiermt import partitioning
from hiermt import train
from hiermt import vocabulary
from hiermt.benchmark import loader
from hiermt.benchmark import params
from hiermt.data import pipeline


def train_step_report(sizes, encoder="crnn", batch=2, tokens=1024, steps=2) -> dict:
  """Decoder forward + backward wall time per example for each size, on the default device.

  The encoder is left out: its features are random inputs of the encoder's
  10 s shape, so only the decoder (and its audio projection) trains.

  Raises:
    ValueError: an unknown size.
  """
  enc = params.encoder_module(encoder)
  audio = params.segment_audio()
  variables = jax.eval_shape(lambda k, a: enc.init(k, a, train=False), jax.random.key(0), audio)
  features = jax.eval_shape(lambda v, a: enc.apply(v, a, train=False)["features"], variables, audio)
  k_audio, k_tokens, k_init = jax.random.split(jax.random.key(0), 3)
  prefix = jax.random.normal(k_audio, (batch,) + features.shape[1:])  # [batch, frames, d_enc]
  token_ids = jax.random.randint(k_tokens, (batch, tokens), 0, vocabulary.VOCAB_SIZE)
  report = {"device": jax.devices()[0].device_kind, "encoder": encoder, "prefix_frames": features.shape[1],
            "batch": batch, "tokens": tokens, "timed_steps": steps, "dtype": "float32",
            "compile_seconds": {}, "seconds_per_example": {}}
  for size in sizes:
    if size not in base.DECODER_SIZES:
      raise ValueError(f"unknown decoder size {size!r}; valid: {', '.join(base.DECODER_SIZES)}")
    decoder = params.decoder_module(size, max_len=tokens)
    weights = jax.jit(decoder.init)(k_init, token_ids, prefix)["params"]

    def loss(p, decoder=decoder):
      logits = decoder.apply({"params": p}, token_ids, prefix)  # [batch, tokens, vocab]
      return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], token_ids[:, 1:]).mean()

    step = jax.jit(jax.value_and_grad(loss))
    start = time.perf_counter()
    jax.block_until_ready(step(weights))  # compile + warm-up
    report["compile_seconds"][size] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    for _ in range(steps):
      jax.block_until_ready(step(weights))
    report["seconds_per_example"][size] = round((time.perf_counter() - start) / (steps * batch), 4)
  return report


def _timed_steps(c, state, next_batch, steps):
  """Seconds per step of `steps` train steps of `c` (train.Compiled) on `next_batch()`; and the state."""
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = c.train_fn(state, next_batch(), c.step_rng)
  jax.block_until_ready(metrics)
  return (time.perf_counter() - start) / steps, state


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
    config = loader.stage_config(stage, options, data_dir)
    config.data.worker_count = workers
    if stage != "encoder":
      config.init_from = "none"
    c = train.compile_steps(config)
    config = c.config  # its batch size fits the mesh: the pipeline must feed exactly that
    it = iter(pipeline.make_dataset(config, config.data.train_split, seed=0))
    host = next(it)
    host.pop("truncated", None)
    tokens = float(host["loss_mask"].sum()) if "loss_mask" in host else 0.0
    fixed = partitioning.global_batch(c.mesh, host)
    state, metrics = c.train_fn(c.state, fixed, c.step_rng)  # compile + warm-up
    jax.block_until_ready(metrics)

    waits = []  # seconds the loop spent blocked on the loader, per loader-fed step

    def from_loader():
      start = time.perf_counter()
      batch = next(it)
      waits.append(time.perf_counter() - start)
      batch.pop("truncated", None)
      return partitioning.global_batch(c.mesh, batch)

    rounds_in_memory, rounds_loader = [], []
    for _ in range(rounds):
      seconds, state = _timed_steps(c, state, lambda: fixed, steps)
      rounds_in_memory.append(seconds)
      seconds, state = _timed_steps(c, state, from_loader, steps)
      rounds_loader.append(seconds)
    in_memory, fed = statistics.median(rounds_in_memory), statistics.median(rounds_loader)
    report["stages"][stage] = {
        "decoder": None if stage == "encoder" else config.decoder.size, "encoder": config.encoder.name,
        "batch": config.train.batch_size, "step_s_in_memory": round(in_memory, 4), "step_s_loader": round(fed, 4),
        "loader_overhead": round(fed / in_memory - 1.0, 4),
        "loader_wait_fraction": round(sum(waits) / (sum(rounds_loader) * steps), 4),
        "round_step_s_in_memory": [round(t, 4) for t in rounds_in_memory],
        "round_step_s_loader": [round(t, 4) for t in rounds_loader],
        "examples_per_s": round(config.train.batch_size / fed, 3),
        "tokens_per_s": round(tokens / fed, 1) if tokens else None}
  return report


def accumulation_report(stages, options, accums, steps, rounds, data_dir="") -> dict:
  """Step time at `train.grad_accum` = k against k x the step time of one micro-batch, per stage.

  At k = 1 a step holds one micro-batch (the config's batch, fitted to the devices); at k it holds
  k of them, so it does k times the work: `overhead` = step(k) / (k x step(1)) - 1 is what
  accumulation itself costs (0 = none). Each k trains on one fixed batch held in memory; the ks
  alternate, `rounds` times `steps` steps each, and each k's time is the median over its rounds.

  Raises:
    ValueError: `accums` lacks 1 or holds a k < 1.
  """
  if 1 not in accums or min(accums) < 1:
    raise ValueError(f"accums must hold 1 (the reference) and only values >= 1, got {accums}")
  report = {"devices": jax.device_count(), "device": jax.devices()[0].device_kind, "options": options,
            "steps_per_round": steps, "rounds": rounds, "stages": {}}
  for stage in stages:
    runs = {}
    micro = None
    for k in sorted(accums):
      logging.info("accumulation: %s, grad_accum %d: compiling and one warm-up step…", stage, k)
      config = loader.stage_config(stage, options, data_dir)
      config.init_from = "none"
      config.train.grad_accum = k
      if micro is not None:
        config.train.batch_size = micro * k
      c = train.compile_steps(config)
      micro = micro or c.config.train.batch_size
      host = next(iter(pipeline.make_dataset(c.config, c.config.data.train_split, seed=0)))
      host.pop("truncated", None)
      batch = partitioning.global_batch(c.mesh, host)
      state, metrics = c.train_fn(c.state, batch, c.step_rng)  # compile + warm-up
      jax.block_until_ready(metrics)
      runs[k] = {"compiled": c, "batch": batch, "state": state, "times": []}
    for r in range(rounds):
      logging.info("accumulation: %s, timing round %d/%d", stage, r + 1, rounds)
      for run in runs.values():
        seconds, run["state"] = _timed_steps(run["compiled"], run["state"], lambda run=run: run["batch"], steps)
        run["times"].append(seconds)
    step_s = {k: statistics.median(run["times"]) for k, run in runs.items()}
    report["stages"][stage] = {
        "micro_batch": micro, "step_s": {k: round(s, 6) for k, s in step_s.items()},
        "overhead": {k: round(s / (k * step_s[1]) - 1.0, 4) for k, s in step_s.items() if k > 1}}
  return report
