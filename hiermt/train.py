"""One trainer for every stage: state init, pure jitted steps, the loop, evaluation.

Stages differ only in config: `encoder` trains the roll heads with its encoder's
published losses (`hiermt.objectives`),
the LM stages train token cross-entropy under each stage's loss mask. The same
code runs on one CPU, one GPU, eight GPUs or many hosts: the batch is split
over a [data, fsdp] mesh and XLA inserts the collectives.

Every `train.eval_every` steps, at the end (and on a preemption when
`train.eval_on_preemption`) the run evaluates: teacher-forced
loss and metrics on `train.eval_batches` validation crops, and the note F1 of
transcribing `train.eval_pieces` validation pieces (`hiermt.validation`), whose
score marks the checkpoint saved at that step as a candidate for the best one.
"""

import copy
import dataclasses
import functools
import itertools
import json
import math
import os
import signal
import time
from typing import Any

from absl import logging
import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax
from tensorboard.summary import Writer

from hiermt import checkpoint
from hiermt import feature_pool
from hiermt import objectives
from hiermt import partitioning
from hiermt import validation
from hiermt.data import pipeline
from hiermt.models import transcriber


@flax.struct.dataclass
class TrainState:
  """step, parameters, BatchNorm statistics, optimiser state and, with `train.ema_decay` > 0, the
  parameters' exponential moving average (`ema_params`; {} without it)."""
  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: optax.OptState
  ema_params: dict = dataclasses.field(default_factory=dict)

  def weights(self):
    """The parameters this state is validated and transcribed with: the moving average when it has one."""
    return self.ema_params or self.params


# The moving average's decay ramps up as min(decay, t / (t + EMA_RAMP)) at step t: the first
# update copies the parameters, and a short stage averages over its own length, not over its start.
EMA_RAMP = 10.0


def ema_update(ema, params, step, decay):
  """The moving average after the update that produced `params` at step `step` (0-based):
  d * ema + (1 - d) * params with d = min(decay, step / (step + EMA_RAMP)).

  Written as ema + (1 - d) (params - ema), so that a parameter that does not move (a frozen
  encoder) keeps its exact value in the average.
  """
  step = jnp.asarray(step, jnp.float32)
  d = jnp.minimum(decay, step / (step + EMA_RAMP))
  return jax.tree.map(lambda e, p: (e + (1.0 - d) * (p - e)).astype(e.dtype), ema, params)


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN/inf loss; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------
# Optimiser
# ----------------------------------------------------------------------------
def learning_rate_schedule(config):
  """Linear warmup to `train.lr`, then `train.decay`: constant, cosine (to zero at `train.steps`)
  or step (x `train.decay_rate` every `train.decay_every` steps, as Kong's and HPPNet's recipes)."""
  t = config.train
  if t.decay == "constant":
    after = optax.constant_schedule(t.lr)
  elif t.decay == "cosine":
    after = optax.cosine_decay_schedule(t.lr, max(1, t.steps - t.warmup_steps))
  elif t.decay == "step":
    if t.decay_every <= 0:
      raise ValueError(f"train.decay=step needs train.decay_every > 0, got {t.decay_every}")
    after = optax.exponential_decay(t.lr, t.decay_every, t.decay_rate, staircase=True)
  else:
    raise ValueError(f"unknown train.decay {t.decay!r}; valid: {', '.join(DECAYS)}")
  if t.warmup_steps <= 0:
    return after
  warmup = optax.linear_schedule(0.0, t.lr, t.warmup_steps)
  return optax.join_schedules([warmup, after], [t.warmup_steps])


DECAYS = ("constant", "cosine", "step")
OPTIMIZERS = ("adamw", "adam", "amsgrad")


def decays_weights(params):
  """Weight-decay mask: kernels and embeddings decay; biases, norm scales and BatchNorm parameters do not."""
  def decays(path, _):
    name = str(getattr(path[-1], "key", path[-1]))
    return name.endswith("kernel") or name == "embedding"
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config):
  """`train.optimizer` with the schedule and optional global-norm clipping; a frozen encoder gets no updates.

  adamw: decoupled weight decay `train.weight_decay` on kernels and embeddings
  only; adam: no decay (HPPNet); amsgrad: Adam with AMSGrad and no decay (Kong).
  """
  t = config.train
  schedule = learning_rate_schedule(config)
  if t.optimizer == "adamw":
    core = optax.adamw(schedule, weight_decay=t.weight_decay, mask=decays_weights)
  elif t.optimizer == "adam":
    core = optax.adam(schedule)
  elif t.optimizer == "amsgrad":
    core = optax.amsgrad(schedule)
  else:
    raise ValueError(f"unknown train.optimizer {t.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
  if t.optimizer != "adamw" and t.weight_decay:
    raise ValueError(f"train.weight_decay={t.weight_decay} needs train.optimizer=adamw (got {t.optimizer!r})")
  tx = optax.chain(optax.clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity(), core)
  if config.stage != "encoder" and config.freeze_encoder:
    # Labels from the parameter tree itself: its top level is {"encoder", "decoder"}.
    labels = lambda params: {k: ("frozen" if k == "encoder" else "train") for k in params}  # noqa: E731
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx


# ----------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------
def loss_counts(config, batch):
  """The normalisers of the stage's loss terms on `batch` (data only; `hiermt.objectives`)."""
  if config.stage == "encoder":
    return objectives.for_encoder(config.encoder.name).counts(batch)
  return objectives.token_counts(batch)


def _forward(model, config, params, batch_stats, batch, rng, train, counts=None):
  """Model output and loss for one (micro)batch. Returns (loss, (metrics, new_batch_stats)).

  `counts` (`loss_counts`) normalise the loss terms; default: this batch's own.
  """
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  mutable = ["batch_stats"] if (train and batch_stats) else False
  kwargs = dict(train=train, rngs={"dropout": rng} if train else None, mutable=mutable)
  if "features" in batch:  # a frozen encoder's features, encoded once (hiermt/feature_pool.py)
    result = model.apply(variables, batch["features"], batch["tokens"], method="decode_features", **kwargs)
  else:
    audio = batch["audio"].astype(jnp.float32) / 32768.0  # [batch, samples]
    inputs = (audio,) if config.stage == "encoder" else (audio, batch["tokens"])
    result = model.apply(variables, *inputs, **kwargs)
  out, updates = result if mutable else (result, {})
  if config.stage == "encoder":
    loss, metrics = objectives.for_encoder(config.encoder.name).loss(out, batch, counts)
  else:
    loss, metrics = objectives.token_loss(out, batch, counts)
  return loss, (metrics, updates.get("batch_stats", batch_stats))


def _micro_loss(model, config, params, batch_stats, batch, rng, counts):
  """One micro-batch's share of the step's loss: its term sums over the whole batch's `counts`.

  Returns (loss, (metrics, new batch_stats)); losses and metrics of the micro-batches add up to
  those of the whole batch (every metric is a count or a sum over the same normaliser).
  """
  return _forward(model, config, params, batch_stats, batch, rng, True, counts)


def _micro_batches(batch, accum, mesh):
  """[B, ...] -> [accum, B/accum, ...] with micro-batch i = rows i, i + accum, i + 2 accum, ...

  Every device holds B/devices consecutive rows, so each micro-batch takes
  B/(devices x accum) rows from every device: it stays split over all devices
  and nothing moves between them (a [accum, B/accum] reshape would put each
  micro-batch on 1/accum of the devices and make XLA gather it).
  """
  def split(x):
    x = jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1)
    if mesh is None:
      return x
    spec = jax.sharding.PartitionSpec(None, partitioning.BATCH_AXES, *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))
  return jax.tree.map(split, batch)


def unroll_accumulation() -> bool:
  """Whether the accumulation loop is unrolled: on CPU only.

  XLA:CPU leaves the gradient convolutions inside a while-loop body in
  non-canonical dimension orders and runs them about 25x slower than the same
  ops outside a loop (a 3-layer conv net's gradient: 131 ms alone, 6.6 s for two
  in a `lax.scan`, 0.25 s unrolled), which made accumulation cost +33 % (HPPNet)
  to +82 % (CRNN) per micro-batch here. Elsewhere the loop stays rolled: compile
  time and peak memory do not grow with the number of micro-batches.
  """
  return jax.default_backend() == "cpu"


def accumulate_gradients(loss_fn, params, batch_stats, batch, rng, accum, counts, mesh=None, unroll=None):
  """Loss and gradient of a batch split into `accum` micro-batches, exactly as without splitting.

  Args:
    loss_fn: (params, batch_stats, micro_batch, rng, counts) -> (loss, (metrics, batch_stats)),
      the micro-batch's loss term sums divided by the whole batch's `counts`.
    params, batch_stats: the model's variables; batch statistics are carried from
      micro-batch to micro-batch (BatchNorm normalises each micro-batch by its own
      statistics, as any accumulation does).
    batch: the (global) batch, split along its first axis.
    rng: micro-batch i uses fold_in(rng, i) (the batch uses rng when accum == 1).
    accum: number of micro-batches; the per-device rows must divide by it.
    counts: the loss terms' normalisers over the whole batch (`loss_counts`).
    mesh: keeps every micro-batch split over all devices (None: no constraint).
    unroll: unroll the loop over micro-batches (None: `unroll_accumulation()`).

  Returns:
    (loss, grads, metrics, batch_stats): losses, gradients and metrics summed over
    the micro-batches.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum == 1:
    (loss, (metrics, batch_stats)), grads = grad_fn(params, batch_stats, batch, rng, counts)
    return loss, grads, metrics, batch_stats

  def body(carry, xs):
    grads_sum, loss_sum, stats = carry
    micro, i = xs
    (loss, (metrics, stats)), g = grad_fn(params, stats, micro, jax.random.fold_in(rng, i), counts)
    return (jax.tree.map(jnp.add, grads_sum, g), loss_sum + loss, stats), metrics

  zeros = jax.tree.map(jnp.zeros_like, params)
  (grads, loss, batch_stats), metrics = jax.lax.scan(
      body, (zeros, jnp.zeros((), jnp.float32), batch_stats), (_micro_batches(batch, accum, mesh), jnp.arange(accum)),
      unroll=unroll_accumulation() if unroll is None else unroll)
  return loss, grads, jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics), batch_stats


def train_step(model, config, tx, state, batch, rng, mesh=None):
  """One optimiser step (with `train.grad_accum` micro-batches, `accumulate_gradients`). Pure; jitted once.

  `batch` may hold "truncated" (bool [B]): their count over the global batch is
  the "truncated_sequences" metric.
  """
  rng = jax.random.fold_in(rng, state.step)
  batch = dict(batch)
  truncated = batch.pop("truncated", None)
  loss, grads, metrics, batch_stats = accumulate_gradients(
      functools.partial(_micro_loss, model, config), state.params, state.batch_stats, batch, rng,
      config.train.grad_accum, loss_counts(config, batch), mesh)
  if truncated is not None:
    metrics["truncated_sequences"] = jnp.sum(truncated.astype(jnp.int32))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
  if state.ema_params:
    new_state = new_state.replace(ema_params=ema_update(state.ema_params, params, state.step,
                                                        config.train.ema_decay))
  return new_state, metrics


def eval_step(model, config, state, batch):
  """Teacher-forced loss and metrics on one batch (no dropout, frozen batch statistics)."""
  loss, (metrics, _) = _forward(model, config, state.weights(), state.batch_stats, batch, None, False)
  return dict(metrics, loss=loss)


# ----------------------------------------------------------------------------
# State
# ----------------------------------------------------------------------------
def create_state(model, config, tx, mesh, rng):
  """Initialises the train state directly into its shardings (no single-device copy)."""
  if not 0.0 <= config.train.ema_decay < 1.0:
    raise ValueError(f"train.ema_decay must be in [0, 1) (0: no moving average), got {config.train.ema_decay}")
  inputs = transcriber.example_inputs(config)

  def init(rng):
    variables = model.init({"params": rng, "dropout": rng}, *inputs, train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      ema_params=params if config.train.ema_decay > 0 else {})

  abstract = jax.eval_shape(init, rng)
  shardings = partitioning.state_shardings(mesh, abstract)
  # Init runs once: skipping XLA's backend optimisations cuts its compile time ~15x on CPU.
  compiled = jax.jit(init, out_shardings=shardings).lower(rng).compile(
      compiler_options={"xla_backend_optimization_level": 0})
  return compiled(rng), shardings


def init_encoder_from(state, config, workdir, shardings):
  """LM stages start their encoder from the encoder stage: params and batch statistics only,
  read straight into this run's shardings (no optimizer state, no single-device copy)."""
  if config.stage == "encoder" or config.init_from == "none":
    return state
  source = os.path.expanduser(config.init_from or checkpoint.stage_dir(workdir, "encoder"))
  like = {}
  for collection in ("params", "batch_stats"):
    tree, sh = getattr(state, collection), getattr(shardings, collection)
    if tree and "encoder" in tree:
      like[collection] = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                      tree["encoder"], sh["encoder"])
  try:
    loaded = checkpoint.load_encoder(source, like=like)
  except checkpoint.MismatchError as e:
    raise ValueError(f"the encoder checkpoint in {source} does not match this config's encoder "
                     f"({config.encoder.name}, width {config.encoder.width}): {e}") from e
  replaced = {c: {**getattr(state, c), "encoder": loaded[c]} for c in like}
  if state.ema_params:  # its own buffers: the train step donates the state's
    replaced["ema_params"] = {**state.ema_params, "encoder": jax.tree.map(jnp.copy, loaded["params"])}
  return state.replace(**replaced)


# ----------------------------------------------------------------------------
# Loop
# ----------------------------------------------------------------------------
# Exit status of a preempted run: EX_TEMPFAIL of sysexits.h ("temporary failure; the user is
# invited to retry"). `launch/slurm.sbatch` requeues the job on it, `launch/paper_recipe.sh`
# stops on it; running the same command again resumes.
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
  """A SIGTERM reached the run: every process saved `step` and stopped; run the same command to resume."""

  def __init__(self, step, directory):
    super().__init__(f"preempted: every process saved step {step} in {directory}; run the same command "
                     f"again to resume (exit status {PREEMPTED_EXIT_CODE})")
    self.step = step
    self.directory = directory


def _preemption_service_running():
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class _Preemption:
  """Decides, after every step, whether all processes stop at this step because of a SIGTERM.

  One process: a SIGTERM handler sets a flag. Several processes: the signal may
  reach one host a step later than another (or only one), and Orbax's save starts
  with a barrier, so stopping on a local flag would deadlock. JAX's preemption
  service (started by `jax.distributed.initialize`, with its own SIGTERM handler
  in every process) tells all processes and names one common step,
  `multihost_utils.reached_preemption_sync_point`; without the service, the flags
  are all-gathered every step.
  """

  def __init__(self):
    self.requested = False
    self._mode = "local"
    if jax.process_count() > 1:
      self._mode = "service" if _preemption_service_running() else "allgather"
    # The service's handler catches SIGTERM in C++; a Python handler would replace it.
    self._previous = signal.signal(signal.SIGTERM, self._handle) if self._mode != "service" else None

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint before exiting")
    self.requested = True

  def stop_after(self, step):
    """Whether every process stops after `step`; call once after every step, on every process."""
    if self._mode == "service":
      return multihost_utils.reached_preemption_sync_point(step)
    if self._mode == "allgather":
      return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))
    return self.requested

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _host_metrics(metrics):
  """Averages a list of per-step metric dicts (on the device or fetched)."""
  host = jax.device_get(metrics)
  out = {k: float(np.mean([m[k] for m in host])) for k in host[0] if not k.startswith("frame_")}
  counts = {k: float(np.sum([m[k] for m in host])) for k in host[0] if k.startswith("frame_")}
  if counts:
    tp, fp, fn = counts["frame_tp"], counts["frame_fp"], counts["frame_fn"]
    out["frame_f1"] = 2 * tp / max(2 * tp + fp + fn, 1.0)
  return out


def evaluate(config, state, mesh, eval_fn):
  """Teacher-forced metrics over `train.eval_batches` fixed validation batches."""
  ds = pipeline.make_dataset(config, config.data.eval_split, seed=config.seed + 1,
                             num_batches=config.train.eval_batches)
  results = []
  for batch in ds:
    batch.pop("truncated", None)
    results.append(eval_fn(state, partitioning.global_batch(mesh, batch)))
  return _host_metrics(results)


def resolve_batch_size(config, num_devices):
  """The global batch a run of `config` uses on `num_devices` devices.

  Every device takes the same number of rows of every one of the
  `train.grad_accum` micro-batches, so the batch must be a multiple of devices x
  grad_accum. Another `train.batch_size` is rounded up to the next such multiple
  when `train.round_batch` is set (the default; a warning says so and config.json
  records the value used), and is an error naming the nearest valid values otherwise.
  """
  t = config.train
  split = num_devices * t.grad_accum
  if t.batch_size % split == 0:
    return t.batch_size
  up = -(-t.batch_size // split) * split
  down = (t.batch_size // split) * split
  if t.get("round_batch", True):
    logging.warning("train.batch_size=%d does not split over %d devices x grad_accum %d: using %d "
                    "(train.round_batch rounds it up; set a multiple of %d to choose yourself)",
                    t.batch_size, num_devices, t.grad_accum, up, split)
    return up
  valid = " or ".join(str(v) for v in (down, up) if v > 0)
  per_device = [a for a in range(1, t.batch_size + 1) if t.batch_size % (num_devices * a) == 0]
  accum_hint = (f", or keep it with train.grad_accum in {per_device}" if per_device else "")
  raise ValueError(f"train.batch_size={t.batch_size} cannot be split over {num_devices} devices x "
                   f"train.grad_accum {t.grad_accum}: use a multiple of {split} (nearest: {valid}){accum_hint}, "
                   f"or set train.round_batch=True to round it up")


@dataclasses.dataclass
class Compiled:
  """Everything a loop needs: the model, the sharded fresh state and the jitted steps."""
  model: Any
  mesh: Any
  state: TrainState
  shardings: Any
  train_fn: Any  # (state, global batch, rng) -> (state, metrics)
  eval_fn: Any  # (state, global batch) -> metrics
  step_rng: jax.Array
  config: Any = None  # the config with the batch size used on this mesh (`resolve_batch_size`)


def compile_steps(config, devices=None):
  """Builds the mesh, model, optimiser, sharded initial state and jitted steps for `config`.

  `Compiled.config` is a copy of `config` whose `train.batch_size` fits the mesh
  (`resolve_batch_size`); data pipelines must use it.
  """
  mesh = partitioning.make_mesh(config.train.fsdp, devices)
  batch_size = resolve_batch_size(config, mesh.size)
  if batch_size != config.train.batch_size:
    config = copy.deepcopy(config)
    config.train.batch_size = batch_size
  model = transcriber.build_model(config)
  init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
  tx = make_optimizer(config)
  state, shardings = create_state(model, config, tx, mesh, init_rng)
  batch_sh = partitioning.batch_sharding(mesh)
  repl = partitioning.replicated(mesh)
  train_fn = jax.jit(functools.partial(train_step, model, config, tx, mesh=mesh),
                     in_shardings=(shardings, batch_sh, repl), out_shardings=(shardings, repl),
                     donate_argnums=(0,))
  eval_fn = jax.jit(functools.partial(eval_step, model, config), in_shardings=(shardings, batch_sh),
                    out_shardings=repl)
  return Compiled(model, mesh, state, shardings, train_fn, eval_fn, step_rng, config)


class _Step:
  """A jitted step compiled ahead of time on first use, logged before and after: compiling a large
  model takes minutes, and a silent start looks like a hang."""

  def __init__(self, name, jitted):
    self.name = name
    self._jitted = jitted
    self._compiled = None

  def compile(self, *args):
    """Compiles for the shapes and shardings of `args` (once); returns the executable."""
    if self._compiled is None:
      logging.info("compiling the %s…", self.name)
      start = time.time()
      self._compiled = self._jitted.lower(*args).compile()
      logging.info("compiled the %s in %.1f s", self.name, time.time() - start)
    return self._compiled

  def __call__(self, *args):
    return self.compile(*args)(*args)


def run(config, workdir, devices=None):
  """Trains `config.stage` into WORKDIR/STAGE, resuming from its newest checkpoint.

  A stage whose newest checkpoint already reached `train.steps` is left alone:
  the run says so and returns None without building anything.

  Args:
    config: the run config (configs/base.py).
    workdir: run directory shared by all stages.
    devices: devices of the mesh; all devices of all processes by default.
  Returns:
    The final train state, or None when the stage was already complete.
  Raises:
    Preempted: a SIGTERM stopped the run after every process saved the same step
      (`python -m hiermt.main` exits with PREEMPTED_EXIT_CODE).
    NonFiniteLossError: the loss became NaN/inf; the last good checkpoint is kept.
    ValueError: the checkpoint to resume does not match this config's model.
  """
  partitioning.initialize_distributed()
  # Identical programs (restarts, later stages, tests) then compile once per machine.
  jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.expanduser(config.data.cache_dir), "xla"))
  directory = checkpoint.stage_dir(workdir, config.stage)
  done = checkpoint.choose(directory, "latest")
  if done is not None and done.step >= config.train.steps:
    logging.info("stage %s is already complete at step %d (train.steps=%d); its checkpoints are in %s. "
                 "Nothing to do (raise --config.train.steps to train further).", config.stage, done.step,
                 config.train.steps, os.path.join(directory, "checkpoints"))
    return None
  feature_pool.check(config)
  c = compile_steps(config, devices)
  config = c.config
  mesh, state, shardings, train_fn, eval_fn, step_rng = c.mesh, c.state, c.shardings, c.train_fn, c.eval_fn, c.step_rng

  manager = checkpoint.make_manager(directory, config)
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
  latest = manager.latest_step()
  if latest is not None:
    try:
      changed = checkpoint.check_resume(directory, latest, abstract_state, config)
    except ValueError:
      manager.close()
      raise
    if changed:
      logging.warning("resuming %s with config changes against its config.json:\n  %s",
                      directory, "\n  ".join(changed))
  checkpoint.write_config(directory, config)
  restored, start_step = checkpoint.restore_latest(manager, abstract_state)
  if restored is not None:
    state = restored
    logging.info("resumed %s from step %d", directory, start_step)
  else:
    state = init_encoder_from(state, config, workdir, shardings)
  # Global batch k is a pure function of (seed, k): the data resume at batch `start_step`.
  if config.train.feature_pool:
    train_iter = feature_pool.FeaturePool(c.model, state, config, mesh, first_batch=start_step)
  else:
    train_iter = iter(pipeline.make_dataset(config, config.data.train_split, seed=config.seed,
                                            first_batch=start_step))
  t = config.train
  is_main = jax.process_index() == 0
  writer = Writer(os.path.join(directory, "tensorboard")) if is_main else None
  metrics_log = open(os.path.join(directory, "metrics.jsonl"), "a") if is_main else None
  schedule = learning_rate_schedule(config)
  preemption = _Preemption()
  pending, window, truncated = [], [], 0
  step = start_step
  preempted = False
  try:
    validator = validation.Validator(config, mesh) if t.eval_pieces > 0 else None
    eval_step = _Step("eval step", eval_fn)
    # The first batch gives the train step its shapes; compiling it before the loop keeps
    # compilation out of the first logged step rate.
    first = next(train_iter)
    train_step = _Step("train step", train_fn)
    train_step.compile(state, partitioning.global_batch(mesh, first), step_rng)
    batches = itertools.chain([first], train_iter)
    last_time, last_step, paused = time.time(), start_step, 0.0
    while step < t.steps:
      state, metrics = train_step(state, partitioning.global_batch(mesh, next(batches)), step_rng)
      step += 1
      pending.append(metrics)
      # Every process asks after every step, so all of them stop after the same one.
      preempted = preemption.stop_after(step) and step < t.steps
      log_now = step % t.log_every == 0 or step == t.steps or preempted  # no step left unlogged
      eval_now = (t.eval_batches > 0 or validator is not None) and (
          step % t.eval_every == 0 or step == t.steps or (preempted and t.eval_on_preemption))
      # A validated state is saved with its score, so that the best one can be kept.
      save_now = step % t.checkpoint_every == 0 or step == t.steps or preempted or (eval_now and validator is not None)
      if not (log_now or eval_now or save_now):
        continue
      host = jax.device_get(pending)
      pending = []
      truncated += sum(int(m.pop("truncated_sequences", 0)) for m in host)  # over the global batches
      window += host
      if not all(math.isfinite(v) for v in _host_metrics(host).values()):
        raise NonFiniteLossError(
            f"non-finite loss at step {step} ({_host_metrics(host)}); stopping. The last good checkpoint "
            f"(step {manager.latest_step()}) is kept in {directory}. Lower --config.train.lr, "
            f"raise warmup, or use float32 compute.")
      if log_now:
        summary = _host_metrics(window)
        window = []
        now = time.time()
        steps_per_s = (step - last_step) / max(now - last_time - paused, 1e-9)
        last_time, last_step, paused = now, step, 0.0
        summary.update(lr=float(schedule(step - 1)), steps_per_s=steps_per_s,
                       examples_per_s=steps_per_s * t.batch_size)
        if "tokens" in summary:
          summary["tokens_per_s"] = steps_per_s * summary.pop("tokens")
        summary["truncated_sequences"] = truncated
        if is_main:
          _log(writer, metrics_log, "train", step, summary, t.steps)
      score, extra = None, None
      if eval_now:
        start = time.time()
        eval_summary = evaluate(config, state, mesh, eval_step) if t.eval_batches > 0 else {}
        if validator is not None:
          eval_summary.update(validator(state))
          score = eval_summary[validation.score_key(config.stage)]
          extra = {key: eval_summary[key] for key in validator.saved_keys}
        paused += time.time() - start
        if is_main:
          _log(writer, metrics_log, "eval", step, eval_summary, t.steps)
      if save_now:
        checkpoint.save(manager, step, state, force=True, score=score, extra=extra)
      if preempted:
        logging.warning("preempted: saved step %d; exiting so that the job can be requeued", step)
        break
  finally:
    manager.wait_until_finished()
    manager.close()
    preemption.restore()
    if hasattr(train_iter, "close"):
      train_iter.close()
    if writer is not None:
      writer.close()
      metrics_log.close()
  if preempted:
    # No process leaves before every process's part of the checkpoint is committed.
    partitioning.barrier("preempted_checkpoint_saved", timeout_s=600)
    raise Preempted(step, directory)
  return state


def _log(writer, metrics_log, prefix, step, summary, total):
  for key, value in summary.items():
    writer.add_scalar(f"{prefix}/{key}", value, step)
  writer.flush()
  metrics_log.write(json.dumps({"split": prefix, "step": step, **summary}) + "\n")
  metrics_log.flush()
  shown = " ".join(f"{k} {v:.4g}" for k, v in summary.items()
                   if k in ("loss", "accuracy", "grad_norm", "steps_per_s", "examples_per_s")
                   or k.endswith(("_f1", "_threshold")))
  logging.info("[%s] step %d/%d (%.1f%%) %s", prefix, step, total, 100.0 * step / total, shown)
