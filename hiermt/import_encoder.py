"""Released encoder checkpoints -> an ordinary encoder stage.

  python -m hiermt.import_encoder --format=kong_crnn --checkpoint=PATH.pth --workdir=DIR

writes DIR/encoder (Orbax checkpoint + config.json of `configs/base.py:encoder`
at full width), which every later stage reads unchanged: the LM stages start
their encoder from it, `transcribe --layout=roll` and `evaluate` decode its rolls.

`kong_crnn`: Kong et al.'s released model (`CRNN_note_F1=0.9677_pedal_F1=0.9186.pth`,
as `piano_transcription_inference` loads it), a dict
`{"model": {"note_model": state_dict, "pedal_model": state_dict}}`; a training
checkpoint of bytedance/piano_transcription (`{"model": note state_dict, ...}`)
or a bare note-model state dict work too. The note model is imported tensor by
tensor (`kong_crnn_variables`); the pedal model, the fixed STFT/mel front-end
buffers and BatchNorm's `num_batches_tracked` are not (hiermt computes the same
log-mel itself) and are listed in the output.

HPPNet's released checkpoints are whole pickled PyTorch modules, which cannot be
read without HPPNet's source; their tensors map onto `hiermt.models.hppnet` the
same way (see the README), but no importer is provided.
"""

if __name__ == "__main__":
  from hiermt import allocator
  allocator.use_tcmalloc()

import sys

from absl import app
from absl import flags
import jax
import numpy as np

from hiermt import checkpoint
from hiermt import command_logging
from hiermt import partitioning
from hiermt import torch_checkpoint
from hiermt import train
from hiermt.models import crnn
from hiermt.models import transcriber

FORMATS = ("kong_crnn",)
# Kong's acoustic models, in hiermt's grouped-head order (crnn.HEADS).
KONG_ACOUSTIC_MODELS = {"frame": "frame_model", "onset": "reg_onset_model", "offset": "reg_offset_model",
                        "velocity": "velocity_model"}
# Conditioning GRUs and their output layers: hiermt name -> Kong name.
KONG_CONDITIONING = {"onset_gru": "reg_onset_gru", "onset_gru_fc": "reg_onset_fc", "frame_gru": "frame_gru",
                     "frame_gru_fc": "frame_fc"}
_IGNORED_PREFIXES = ("spectrogram_extractor.", "logmel_extractor.")


def note_state_dict(loaded) -> tuple[dict, list[str]]:
  """Kong's note-model state dict from whatever a checkpoint file holds, and what was left out."""
  ignored = []
  state = loaded.get("model", loaded) if isinstance(loaded, dict) else None
  if isinstance(state, dict) and "note_model" in state:
    ignored += [f"pedal_model ({len(state.get('pedal_model', {}))} tensors)"] if "pedal_model" in state else []
    state = state["note_model"]
  if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
    raise ValueError("not a Kong CRNN checkpoint: expected {'model': {'note_model': state_dict, ...}} "
                     "or a note-model state dict")
  return state, ignored


class _Reader:
  """Takes tensors out of a state dict by name, recording what it asked for.

  A missing tensor is recorded and stood in for by a dummy array, so one pass
  over the mapping names everything that is missing.
  """

  def __init__(self, state):
    self.state = dict(state)
    self.used = set()
    self.missing = []

  def take(self, name):
    if name not in self.state:
      self.missing.append(name)
      return np.zeros((1, 1, 1, 1), np.float32)  # survives the transposes and stacking of the mapping
    self.used.add(name)
    return np.asarray(self.state[name], np.float32)


def _gru(read, name, layer):
  """One torch GRU layer (both directions) -> hiermt's stacked [2, ...] kernels and biases."""
  suffixes = (f"_l{layer}", f"_l{layer}_reverse")
  return {
      "input_kernel": np.stack([read.take(f"{name}.weight_ih{s}").T for s in suffixes]),  # [2, in, 3 * hidden]
      "input_bias": np.stack([read.take(f"{name}.bias_ih{s}") for s in suffixes]),
      "recurrent_kernel": np.stack([read.take(f"{name}.weight_hh{s}").T for s in suffixes]),  # [2, hidden, 3h]
      "recurrent_bias": np.stack([read.take(f"{name}.bias_hh{s}") for s in suffixes]),
  }


def _batch_norm(read, name):
  params = {"scale": read.take(f"{name}.weight"), "bias": read.take(f"{name}.bias")}
  stats = {"mean": read.take(f"{name}.running_mean"), "var": read.take(f"{name}.running_var")}
  return params, stats


def _dense(read, name, bias=True):
  out = {"kernel": read.take(f"{name}.weight").T}  # torch [out, in] -> [in, out]
  if bias:
    out["bias"] = read.take(f"{name}.bias")
  return out


def kong_crnn_variables(state: dict) -> tuple[dict, list[str]]:
  """hiermt CRNN variables from Kong's note-model state dict, every tensor mapped explicitly.

  Conv kernels [out, in, time, freq] -> [time, freq, in, out]; linear weights
  are transposed; GRU weights keep PyTorch's (r, z, n) gate order, the two
  directions and the four acoustic models' GRUs stacked as hiermt's grouped
  scans expect; BatchNorm weight/bias/running statistics -> scale/bias/mean/var.

  Returns:
    ({"params": ..., "batch_stats": ...}, names of the state dict's ignored entries).
  Raises:
    ValueError: missing or unexpected tensors (named), or a shape that does not fit.
  """
  params, stats, read = _map_kong(state)
  ignored = sorted(n for n in state if n.startswith(_IGNORED_PREFIXES) or n.endswith(".num_batches_tracked"))
  unexpected = sorted(set(state) - read.used - set(ignored))
  if read.missing or unexpected:
    raise ValueError("the checkpoint does not match Kong's note model (Regress_onset_offset_frame_velocity_CRNN):"
                     f" missing {read.missing or 'nothing'}; unexpected {unexpected or 'nothing'}")
  _check_shapes(params, stats)
  return {"params": params, "batch_stats": stats}, ignored


def _map_kong(state):
  """(params, batch_stats, reader) of the mapping; the reader knows what was missing and used."""
  read = _Reader(state)
  params, stats = {}, {}
  params["mel_norm"], stats["mel_norm"] = _batch_norm(read, "bn0")
  for head, kong in KONG_ACOUSTIC_MODELS.items():
    front_params, front_stats = {}, {}
    for block in range(4):
      convs = {f"Conv_{i}": {"kernel": read.take(f"{kong}.conv_block{block + 1}.conv{i + 1}.weight")
                                       .transpose(2, 3, 1, 0)} for i in range(2)}
      norms = [_batch_norm(read, f"{kong}.conv_block{block + 1}.bn{i + 1}") for i in range(2)]
      front_params[f"_ConvBlock_{block}"] = {**convs, **{f"BatchNorm_{i}": p for i, (p, _) in enumerate(norms)}}
      front_stats[f"_ConvBlock_{block}"] = {f"BatchNorm_{i}": s for i, (_, s) in enumerate(norms)}
    front_params["fc5"] = _dense(read, f"{kong}.fc5", bias=False)
    front_params["BatchNorm_0"], front_stats["BatchNorm_0"] = _batch_norm(read, f"{kong}.bn5")
    params[f"{head}_model"], stats[f"{head}_model"] = front_params, front_stats
    params[f"{head}_fc"] = _dense(read, f"{kong}.fc")
  for layer in range(2):
    per_head = [_gru(read, f"{kong}.gru", layer) for kong in KONG_ACOUSTIC_MODELS.values()]
    params[f"acoustic_gru_{layer}"] = {k: np.stack([g[k] for g in per_head]) for k in per_head[0]}
  for ours, kong in KONG_CONDITIONING.items():
    params[ours] = _gru(read, kong, 0) if ours.endswith("gru") else _dense(read, kong)
  return params, stats, read


def _check_shapes(params, stats):
  """Raises ValueError naming the first tensor whose shape differs from hiermt's full-width CRNN."""
  expected = jax.eval_shape(lambda: crnn.CRNN(width=1.0).init(jax.random.key(0), np.zeros((1, 1600), np.float32),
                                                              train=False))
  got = {"params": params, "batch_stats": stats}
  if jax.tree.structure(got) != jax.tree.structure(expected):
    raise ValueError("imported tree differs from hiermt's CRNN parameter tree")
  for (path, want), have in zip(jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(got)):
    if tuple(want.shape) != have.shape:
      raise ValueError(f"{jax.tree_util.keystr(path)}: imported shape {have.shape}, hiermt expects {want.shape}")


def import_kong_crnn(loaded, workdir, config) -> list[str]:
  """Writes WORKDIR/encoder for `config` (an encoder-stage CRNN config) from Kong's checkpoint.

  Args:
    loaded: the checkpoint file's contents (`torch_checkpoint.read`).
    workdir: the run directory.
    config: the encoder stage's config (full-width CRNN).

  Returns:
    The names of what was not imported.
  """
  state, ignored = note_state_dict(loaded)
  variables, skipped = kong_crnn_variables(state)
  model = transcriber.build_model(config)
  mesh = partitioning.make_mesh(1, jax.devices()[:1])
  fresh, _ = train.create_state(model, config, train.make_optimizer(config), mesh, jax.random.key(config.seed))
  imported = fresh.replace(params={"encoder": variables["params"]}, batch_stats={"encoder": variables["batch_stats"]},
                           ema_params={"encoder": variables["params"]} if fresh.ema_params else {})
  if jax.tree.structure(imported.params) != jax.tree.structure(fresh.params):
    raise ValueError("the imported parameters do not fit the encoder stage's model tree")
  checkpoint.write_stage(checkpoint.stage_dir(workdir, "encoder"), config, imported)
  return ignored + skipped


def _define_flags():
  flags.DEFINE_enum("format", "kong_crnn", FORMATS, "Checkpoint format: kong_crnn (Kong et al.'s released CRNN).")
  flags.DEFINE_string("checkpoint", None, "The released .pth file.")
  flags.DEFINE_string("workdir", None, "Run directory; the encoder stage is written to WORKDIR/encoder.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing WORKDIR/encoder.")
  flags.mark_flags_as_required(["checkpoint", "workdir"])


def main(argv):
  command_logging.hiermt_info_only()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  FLAGS = flags.FLAGS  # noqa: N806
  from configs import base  # pylint: disable=import-outside-toplevel  (a config file, read from the repo root)
  target = checkpoint.stage_dir(FLAGS.workdir, "encoder")
  if checkpoint.has_checkpoint(target) and not FLAGS.overwrite:
    print(f"import_encoder: {target} already holds an encoder checkpoint; pass --overwrite to replace it",
          file=sys.stderr)
    sys.exit(2)
  config = base.get_config("encoder,encoder=crnn")
  try:
    left_out = import_kong_crnn(torch_checkpoint.read(FLAGS.checkpoint), FLAGS.workdir, config)
  except (FileNotFoundError, ValueError) as e:
    print(f"import_encoder: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"imported Kong's CRNN note model into {target}")
  if left_out:
    shown = ", ".join(left_out[:6]) + (f" and {len(left_out) - 6} more" if len(left_out) > 6 else "")
    print(f"not imported (hiermt computes the log-mel itself and has no pedal model): {shown}")
  print(f"next: python -m hiermt.transcribe --workdir={FLAGS.workdir} --layout=roll --output_dir=OUT AUDIO..., "
        f"or train the LM stages, e.g. python -m hiermt.main --config=configs/base.py:onset_pitch "
        f"--workdir={FLAGS.workdir}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
