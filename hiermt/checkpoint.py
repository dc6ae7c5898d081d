"""Orbax checkpoints of one stage under WORKDIR/STAGE/, and encoder hand-over between stages.

A checkpoint holds the whole train state and each process's Grain iterator state,
so a restarted run continues the same loss curve on the same data.
"""

import contextlib
import logging as std_logging
import os

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp

from hiermt import atomic_file


def stage_dir(workdir, stage):
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), stage)


def make_manager(directory, config):
  """A CheckpointManager keeping the last `train.keep_checkpoints` saves (async)."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.train.keep_checkpoints, create=True, enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(directory, "checkpoints"), options=options)


def save(manager, step, state, data_iter, *, force=False):
  """Saves state + iterator state at `step` (asynchronously for the arrays)."""
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data_iter=grain.checkpoint.CheckpointSave(data_iter)), force=force)


def restore_latest(manager, abstract_state, data_iter):
  """Restores the newest checkpoint into `abstract_state`'s shapes and shardings.

  Returns (state, step), or (None, 0) when the directory has no checkpoint. The
  iterator is restored in place.
  """
  step = manager.latest_step()
  if step is None:
    return None, 0
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data_iter=grain.checkpoint.CheckpointRestore(data_iter)))
  return restored["state"], step


class _DropMissingMetadata(std_logging.Filter):
  """Orbax warns that a step's item folder has no metadata file when it is read directly, as
  `load_variables` does; the file lives one level up, so the warning is noise."""

  def filter(self, record):
    return "Metadata file does not exist" not in record.getMessage()


@contextlib.contextmanager
def _quiet_item_metadata():
  handler_filter = _DropMissingMetadata()
  logger = std_logging.getLogger("absl")
  logger.addFilter(handler_filter)
  try:
    yield
  finally:
    logger.removeFilter(handler_filter)


def has_checkpoint(directory) -> bool:
  """Whether a stage directory holds a finished checkpoint (Orbax names them by step)."""
  ckpt_dir = os.path.join(directory, "checkpoints")
  return os.path.isdir(ckpt_dir) and any(name.isdigit() for name in os.listdir(ckpt_dir))


def load_variables(directory, missing_hint):
  """Params and batch statistics of the newest checkpoint in a stage directory, as host arrays.

  Restores onto this process's first device whatever the saving topology was
  (other device or process count), using the saved shapes and dtypes; the
  optimizer state is read from disk but not kept.

  Args:
    directory: WORKDIR/STAGE.
    missing_hint: what to do when there is no checkpoint (appended to the error).

  Returns:
    ({"params": ..., "batch_stats": ...}, step).
  Raises:
    FileNotFoundError: no checkpoint in `directory`.
  """
  ckpt_dir = os.path.join(directory, "checkpoints")
  manager = ocp.CheckpointManager(ckpt_dir) if os.path.isdir(ckpt_dir) else None
  step = manager.latest_step() if manager else None
  if manager:
    manager.close()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory}. {missing_hint}")
  path = os.path.join(ckpt_dir, str(step), "state")
  with ocp.StandardCheckpointer() as checkpointer, _quiet_item_metadata():
    saved = checkpointer.metadata(path).item_metadata
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local), saved)
    state = checkpointer.restore(path, abstract)
  return {c: state.get(c) or {} for c in ("params", "batch_stats")}, step


def load_encoder(directory):
  """Params (and batch statistics) of the encoder from the newest checkpoint in `directory`.

  `directory` is an encoder-stage directory (WORKDIR/encoder) or any stage directory
  whose state holds an `encoder` subtree. Returns {"params": ..., "batch_stats": ...}
  as host arrays.
  Raises:
    FileNotFoundError: no checkpoint there, with what to run first.
  """
  variables, step = load_variables(
      directory,
      "Pretrain the encoder first (python -m hiermt.main --config=configs/base.py:encoder --workdir=WORKDIR), "
      "point --config.init_from at a stage directory that has one, or set --config.init_from=none "
      "to start the encoder from scratch")
  # The encoder stage trains the encoder alone; LM stages nest it under "encoder".
  out = {c: tree.get("encoder", tree) if isinstance(tree, dict) else tree for c, tree in variables.items()}
  logging.info("encoder initialised from %s (step %d)", directory, step)
  return out


def write_stage(directory, config, state):
  """Writes `state` as the newest checkpoint of a stage directory, with its config.json.

  For checkpoints made outside the training loop (imported encoders, tests,
  benchmarks): `transcribe.load` and the encoder hand-over read them like any
  other; they hold no data-iterator state, so training does not resume from them.
  """
  write_config(directory, config)
  manager = make_manager(directory, config)
  manager.save(int(state.step), args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
  manager.wait_until_finished()
  manager.close()


def write_config(directory, config):
  """Writes config.json (process 0 only), atomically."""
  if jax.process_index() != 0:
    return
  with atomic_file.atomic_output(os.path.join(directory, "config.json")) as tmp:
    with open(tmp, "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
