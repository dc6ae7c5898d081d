"""Orbax checkpoints of one stage under WORKDIR/STAGE/, and encoder hand-over between stages.

A checkpoint holds the whole train state and the data position (the next global
batch index; batch k is a pure function of the seed and k), so a restarted run
continues the same loss curve on the same data on any number of processes,
devices or loader workers.

Checkpoints saved right after a validation pass carry its score (`SCORE`, the
stage's note F1, `hiermt.validation`). The last `train.keep_checkpoints` are
kept and, besides them, the one with the highest score: the "best" checkpoint,
which transcription and evaluation read by default. Resuming reads the latest.
"""

import contextlib
import dataclasses
import json
import logging as std_logging
import os

from absl import logging
import jax
import orbax.checkpoint as ocp

from hiermt import atomic_file


def stage_dir(workdir, stage):
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), stage)


# The checkpoint metric Orbax ranks by: higher is better.
SCORE = "score"
CHOICES = ("best", "latest")


def _score(metrics):
  return metrics[SCORE]


def _manager(directory, keep=None):
  """Orbax's manager of WORKDIR/STAGE/checkpoints; with `keep`, one that saves (asynchronously) and keeps
  the newest `keep` checkpoints plus the best-scored one."""
  options = dict(best_fn=_score, best_mode="max")
  if keep is not None:
    options.update(create=True, enable_async_checkpointing=True,
                   preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy([
                       ocp.checkpoint_managers.LatestN(n=keep),
                       ocp.checkpoint_managers.BestN(get_metric_fn=_score, n=1,
                                                     keep_checkpoints_without_metrics=False)]))
  return ocp.CheckpointManager(os.path.join(directory, "checkpoints"),
                               options=ocp.CheckpointManagerOptions(**options))


def make_manager(directory, config):
  """A CheckpointManager keeping the last `train.keep_checkpoints` saves and the best-scored one (async)."""
  return _manager(directory, keep=config.train.keep_checkpoints)


class _DropUnscoredWarning(std_logging.Filter):
  """Orbax warns about every save without metrics once a manager ranks checkpoints; only saves
  after a validation pass carry a score, so the warning is noise."""

  def filter(self, record):
    return "did not provide metrics" not in record.getMessage()


def save(manager, step, state, *, force=False, score=None, extra=None):
  """Saves state (asynchronously) and the data position at `step`: the run continues with batch `step`.

  `score`: the validation score of `state` (higher is better), which makes the
  checkpoint a candidate for the best one; every process must pass the same value.
  `extra`: more numbers stored beside the score (name -> float, e.g. the Roll
  thresholds calibrated with it), read back as `Choice.metrics`; only with a score.
  """
  args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"next_batch": int(step)}))
  if extra and score is None:
    raise ValueError("checkpoint.save: `extra` metrics need a `score`")
  metrics = None if score is None else {SCORE: float(score), **{k: float(v) for k, v in (extra or {}).items()}}
  with _filtered(_DropUnscoredWarning()):
    return manager.save(step, args=args, metrics=metrics, force=force)


def restore_latest(manager, abstract_state):
  """Restores the newest checkpoint into `abstract_state`'s shapes and shardings.

  Returns (state, step), or (None, 0) when the directory has no checkpoint; the
  data stream resumes at global batch `step` (`pipeline.make_dataset(first_batch=step)`).
  Checkpoints of earlier versions also hold per-process Grain iterator states
  ("data_iter"): they are not read, which is what lets a run resume on another
  number of processes.
  """
  step = manager.latest_step()
  if step is None:
    return None, 0
  saved = _saved_tree(os.path.join(manager.directory, str(step), "state"))
  # A train-state field that is empty unless its option is on (`ema_params`) is absent from
  # checkpoints written before it existed: restore the others and keep it empty.
  is_dataclass = dataclasses.is_dataclass(abstract_state)
  parts = ({f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)}
           if is_dataclass else dict(abstract_state))
  absent = {name: part for name, part in parts.items() if name not in saved and not jax.tree.leaves(part)}
  target = {name: part for name, part in parts.items() if name not in absent}
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
  return (abstract_state.replace(**restored) if is_dataclass else {**restored, **absent}), step


def _flat_shapes(tree):
  """{'params/encoder/conv/kernel': (shape, dtype)} of a pytree of arrays or array metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): (tuple(x.shape), str(x.dtype))
          for path, x in leaves}


def _flat_config(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _shape_diffs(saved_tree, wanted_tree) -> list[str]:
  """"name: checkpoint SHAPE, this config SHAPE" for each variable that is absent from one tree or
  shaped differently; params first, then batch statistics, then the rest."""
  saved, want = _flat_shapes(saved_tree), _flat_shapes(wanted_tree)
  order = lambda k: (0 if k.startswith("params") else 1 if k.startswith("batch_stats") else 2, k)  # noqa: E731
  return [f"{k}: checkpoint {saved[k][0] if k in saved else '(absent)'}, "
          f"this config {want[k][0] if k in want else '(absent)'}"
          for k in sorted(set(saved) | set(want), key=order) if saved.get(k, (None,))[0] != want.get(k, (None,))[0]]


def _listed(lines, limit=20) -> str:
  return "\n  ".join(lines[:limit] + ([f"... {len(lines) - limit} more"] if len(lines) > limit else []))


def check_variables(variables, abstract_variables, directory):
  """Refuses checkpoint `variables` (e.g. `load_variables`) that do not fit the model built from the
  stage's config, `abstract_variables` (its init's shapes), naming the variables that differ.

  Raises:
    ValueError: a variable is missing, extra or reshaped (a checkpoint saved by another version of
      the model's code).
  """
  diffs = _shape_diffs(variables, abstract_variables)
  if diffs:
    raise ValueError(f"the checkpoint in {directory} does not fit the model its config.json builds in this "
                     f"version of hiermt (saved by another version?). Variables that differ:\n  {_listed(diffs)}\n"
                     f"Retrain the stage into a new --workdir.")


def check_resume(directory, step, abstract_state, config):
  """Before resuming `directory` at `step`: refuses a model whose variables changed shape.

  Compares `abstract_state` (this run's state) with the checkpoint's saved shapes
  and this config with the stage's config.json.

  Returns:
    The config fields that differ from config.json, as "key: old -> new" strings
    (logged by the caller; fine to change: optimiser, steps, logging, data, ...).
  Raises:
    ValueError: variables were added, removed or reshaped, naming them and the
      config fields that differ.
  """
  changed = []
  config_path = os.path.join(directory, "config.json")
  if os.path.exists(config_path):
    with open(config_path) as f:
      old = _flat_config(json.load(f))
    new = _flat_config(json.loads(config.to_json_best_effort()))
    changed = [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}"
               for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
  path = os.path.join(directory, "checkpoints", str(step), "state")
  diffs = _shape_diffs(_saved_tree(path), abstract_state)
  if diffs:
    shown = _listed(diffs)
    fields = "\n  ".join(changed) or "(none: config.json is missing or equal)"
    raise ValueError(
        f"cannot resume {directory} at step {step}: this config's train state (model or optimizer) does not "
        f"match the checkpoint's.\n"
        f"Variables that differ:\n  {shown}\nConfig fields that differ from {config_path}:\n  {fields}\n"
        f"Restore the original values, or train into another --workdir.")
  return changed


class _DropMissingMetadata(std_logging.Filter):
  """Orbax warns that a step's item folder has no metadata file when it is read directly, as
  `load_variables` does; the file lives one level up, so the warning is noise."""

  def filter(self, record):
    return "Metadata file does not exist" not in record.getMessage()


@contextlib.contextmanager
def _filtered(log_filter):
  """Applies `log_filter` to absl's logger (where Orbax logs) for the duration of the block."""
  logger = std_logging.getLogger("absl")
  logger.addFilter(log_filter)
  try:
    yield
  finally:
    logger.removeFilter(log_filter)


def _quiet_item_metadata():
  return _filtered(_DropMissingMetadata())


def _saved_tree(path):
  """The tree of array metadata (shapes, dtypes) of the state saved at `path`; no array is read."""
  with ocp.StandardCheckpointer() as checkpointer, _quiet_item_metadata():
    return checkpointer.metadata(path).item_metadata


def has_checkpoint(directory) -> bool:
  """Whether a stage directory holds a finished checkpoint (Orbax names them by step)."""
  ckpt_dir = os.path.join(directory, "checkpoints")
  return os.path.isdir(ckpt_dir) and any(name.isdigit() for name in os.listdir(ckpt_dir))


@dataclasses.dataclass(frozen=True)
class Choice:
  """The checkpoint of a stage directory that is read, and why.

  Attributes:
    step: the checkpoint read.
    kind: "best" (the highest validation score) or "latest".
    score: its validation score, None when it has none.
    latest: the newest checkpoint's step.
    requested: what the caller asked for; "best" falls back to the latest when no
      checkpoint carries a score (the stage was trained without validation).
    metrics: everything saved with its score (`save`), None when it has no score.
  """
  step: int
  kind: str
  score: float | None
  latest: int
  requested: str
  metrics: dict | None = None

  def describe(self) -> str:
    """One line for logs: which checkpoint, its score, and the fallback if there was one."""
    scored = f", validation score {self.score:.4f}" if self.score is not None else ""
    text = f"{self.kind} checkpoint, step {self.step}{scored}"
    if self.kind != "latest":
      text += f" (latest: step {self.latest})"
    if self.requested == "best" and self.kind == "latest":
      text = (f"no best checkpoint (none carries a validation score: trained with train.eval_pieces=0, "
              f"imported, or written by an older hiermt): using the {text}")
    return text


def choose(directory, which="latest"):
  """The `which` ("best" or "latest") checkpoint of a stage directory, or None when it has none.

  "best" is the checkpoint with the highest validation score, or the latest when
  no checkpoint carries a score (`Choice.describe` says so).
  """
  if which not in CHOICES:
    raise ValueError(f"unknown checkpoint choice {which!r}; valid: {', '.join(CHOICES)}")
  if not os.path.isdir(os.path.join(directory, "checkpoints")):
    return None
  manager = _manager(directory)
  try:
    latest = manager.latest_step()
    if latest is None:
      return None
    best = manager.best_step() if which == "best" else None
    step = latest if best is None else best
    metrics = manager.metrics(step)
  finally:
    manager.close()
  metrics = dict(metrics) if metrics else None
  return Choice(step=step, kind="latest" if best is None else "best",
                score=None if metrics is None else float(_score(metrics)), latest=latest, requested=which,
                metrics=metrics)


def _state_path(directory, which, missing_hint):
  """(path of the chosen checkpoint's state item, `Choice`); FileNotFoundError with `missing_hint` when none."""
  choice = choose(directory, which)
  if choice is None:
    raise FileNotFoundError(f"no checkpoint in {directory}. {missing_hint}")
  return os.path.join(directory, "checkpoints", str(choice.step), "state"), choice


class MismatchError(ValueError):
  """A checkpoint's variables do not have the shapes this config's model needs."""


def _weights_source(saved, collection):
  """The saved state's entry that `collection` is read from: "params" stands for the weights a
  stage is used with, its parameters' moving average (`ema_params`) when its run kept one."""
  ema = saved.get("ema_params") if hasattr(saved, "get") else None
  return "ema_params" if collection == "params" and ema is not None and jax.tree.leaves(ema) else collection


def _restore_subtrees(path, subtrees, like=None):
  """Restores only `subtrees` ({collection: key path, () for all of it}) of the state saved at `path`.

  Nothing else (optimizer state, other subtrees) is read. "params" reads the
  moving average of the parameters instead when the run kept one (`_weights_source`).

  Args:
    path: a checkpoint's `state` item folder.
    subtrees: what to read, e.g. {"params": ("encoder",)}.
    like: optional {collection: pytree of arrays or ShapeDtypeStructs}: the
      restored subtree must have its structure and shapes, and each array lands
      in its sharding (each process reads only its shards). Without it, arrays
      land on this process's first device with the saved shapes and dtypes.
  Returns:
    {collection: restored subtree, or {} where the checkpoint has none}.
  Raises:
    MismatchError: `like` and the checkpoint differ, naming the variables.
  """
  with _quiet_item_metadata():
    saved = _saved_tree(path)
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {}
    sources = {collection: _weights_source(saved, collection) for collection in subtrees}
    for collection, keys in subtrees.items():
      node = saved.get(sources[collection]) if hasattr(saved, "get") else None
      for key in keys:
        node = node.get(key) if hasattr(node, "get") else None
      want = (like or {}).get(collection)
      if node is None or not jax.tree.leaves(node):
        if want is not None and jax.tree.leaves(want):
          raise MismatchError(f"{path} has no {'/'.join((collection,) + tuple(keys))} subtree")
        continue
      if want is None:
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=local), node)
      else:
        have, need = _flat_shapes(node), _flat_shapes(want)
        diffs = [f"{collection}/{k}: checkpoint {have[k][0] if k in have else '(absent)'}, "
                 f"wanted {need[k][0] if k in need else '(absent)'}"
                 for k in sorted(set(have) | set(need)) if have.get(k, (None,))[0] != need.get(k, (None,))[0]]
        if diffs:
          raise MismatchError(f"{path} does not match: " + "; ".join(diffs[:10]) +
                              (f"; ... {len(diffs) - 10} more" if len(diffs) > 10 else ""))
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), want)
      for key in reversed(keys):
        abstract = {key: abstract}
      target[sources[collection]] = abstract
    restored = {}
    if target:
      with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
  out = {}
  for collection, keys in subtrees.items():
    node = restored.get(sources[collection], {})
    for key in keys:
      node = node.get(key, {})
    out[collection] = node
  return out


def load_variables(directory, missing_hint, which="latest"):
  """Params and batch statistics of a stage directory's best or latest checkpoint.

  Restores onto this process's first device whatever the saving topology was
  (other device or process count), using the saved shapes and dtypes; nothing
  else of the state (optimizer moments) is read. Logs which checkpoint is read
  (a warning when "best" falls back to the latest).

  Args:
    directory: WORKDIR/STAGE.
    missing_hint: what to do when there is no checkpoint (appended to the error).
    which: "best" or "latest" (`choose`).

  Returns:
    ({"params": ..., "batch_stats": ...}, the `Choice` read).
  Raises:
    FileNotFoundError: no checkpoint in `directory`.
  """
  path, choice = _state_path(directory, which, missing_hint)
  log = logging.warning if choice.kind != choice.requested else logging.info
  log("%s: %s", directory, choice.describe())
  return _restore_subtrees(path, {"params": (), "batch_stats": ()}), choice


def load_encoder(directory, like=None):
  """Params (and batch statistics) of the encoder from the newest checkpoint in `directory`.

  `directory` is an encoder-stage directory (WORKDIR/encoder) or any stage directory
  whose state holds an `encoder` subtree (every stage's model nests it so). Only
  that subtree is read: no optimizer state, no decoder.

  Args:
    directory: the stage directory.
    like: {"params": ..., "batch_stats": ...} encoder subtrees (arrays or
      ShapeDtypeStructs with shardings) to restore into: shapes are checked and
      each process reads only its shards. None: this process's first device.
  Returns:
    {"params": ..., "batch_stats": ...} (an empty dict for a collection the encoder lacks).
  Raises:
    FileNotFoundError: no checkpoint there, with what to run first.
    MismatchError: the saved encoder does not have `like`'s shapes.
  """
  path, choice = _state_path(
      directory, "latest",
      "Pretrain the encoder first (python -m hiermt.main --config=configs/base.py:encoder --workdir=WORKDIR), "
      "point --config.init_from at a stage directory that has one, or set --config.init_from=none "
      "to start the encoder from scratch")
  out = _restore_subtrees(path, {"params": ("encoder",), "batch_stats": ("encoder",)}, like)
  if not out["params"]:
    raise ValueError(f"the checkpoint {path} holds no params/encoder subtree")
  logging.info("encoder initialised from %s (step %d)", directory, choice.step)
  return out


def write_stage(directory, config, state, score=None, extra=None):
  """Writes `state` as the newest checkpoint of a stage directory, with its config.json.

  For checkpoints made outside the training loop (imported encoders, tests,
  benchmarks): `transcribe.load` and the encoder hand-over read them like any
  other; a training run in that directory resumes from them at batch `state.step`
  as from its own. `score`, `extra`: a validation score and what is saved with it, as `save`.
  """
  write_config(directory, config)
  manager = make_manager(directory, config)
  save(manager, int(state.step), state, force=True, score=score, extra=extra)
  manager.wait_until_finished()
  manager.close()


def write_config(directory, config):
  """Writes config.json (process 0 only), atomically."""
  if jax.process_index() != 0:
    return
  with atomic_file.atomic_output(os.path.join(directory, "config.json")) as tmp:
    with open(tmp, "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
