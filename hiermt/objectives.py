"""Training objectives: each encoder's published roll targets and loss, and the LM stages' token loss.

The encoder stage trains the roll heads the way each encoder's authors did.
`for_encoder(config.encoder.name)` is the one place that chooses them:

* `crnn` (Kong et al. 2021, bytedance/piano_transcription): regression
  targets (`rolls.kong_targets`); binary cross-entropy of the onset, offset
  and frame heads against them under the crop mask, plus BCE of the velocity
  head against velocity / 128 on onset frames; the four terms summed.
* `hppnet` (Wei et al. 2022, WX-Wei/HPPNet `transcriber.py`): one-frame binary
  targets (`rolls.hppnet_targets`); onset BCE with the positive term weighted
  2, BCE for offset and frame, each a mean over all frames and pitches; the
  velocity head's squared error against velocity / 128 summed over onset
  frames and divided by their count (0 without onsets); the four terms summed.

Every loss is computed in float32 from the heads' logits (log-sigmoid form),
so a confident wrong prediction keeps its gradient under a bfloat16 compute
dtype instead of sitting on a clipped probability.

Every loss is a sum of terms, each a sum over cells divided by a count that
depends on the data only (`kong_counts`, `hppnet_counts`, `token_counts`).
Given the whole batch's counts, the losses of its micro-batches add up to the
batch's loss, which makes gradient accumulation exact (`train.accumulate_gradients`).
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from hiermt.data import rolls

def binary_cross_entropy(logits, target, positive_weight=1.0):
  """Elementwise -(w * y * log(sigmoid(x)) + (1 - y) * log(1 - sigmoid(x))), stable in float32."""
  logits = logits.astype(jnp.float32)
  return -(positive_weight * target * jax.nn.log_sigmoid(logits) + (1.0 - target) * jax.nn.log_sigmoid(-logits))


def _terms(sums, counts):
  """(loss, metrics) of per-term sums over per-term counts: sum_k sums[k] / max(counts[k], 1)."""
  means = {k: sums[k] / jnp.maximum(counts[k], 1.0) for k in sums}
  return sum(means.values()), {f"loss_{k}": v for k, v in means.items()}


def _frame_counts(out, batch):
  """Frame-level true/false positive and false negative counts at threshold 0.5, for frame F1."""
  pred = out["frame"] >= 0.5
  ref = batch["frame"] >= 0.5
  return {"frame_tp": jnp.sum(pred & ref), "frame_fp": jnp.sum(pred & ~ref), "frame_fn": jnp.sum(~pred & ref)}


def _crop_mask(batch):
  """Kong's crop mask `[batch, frames, 88]` (frames a crop start cuts into); all ones without one."""
  return batch["mask"] if "mask" in batch else jnp.ones_like(batch["frame"], jnp.float32)


def kong_counts(batch):
  """Normalisers of Kong's loss terms: unmasked frames x keys, and onset-mask frames for velocity."""
  frames = jnp.sum(_crop_mask(batch))
  return {"onset": frames, "offset": frames, "frame": frames, "velocity": jnp.sum(batch["onset_mask"])}


def kong_loss(out, batch, counts=None):
  """Kong et al.'s note loss. `out` holds the encoder's `logits` and `frame` probabilities.

  Args:
    out: encoder outputs.
    batch: targets (`rolls.kong_targets`) and the crop "mask".
    counts: the terms' normalisers; default this batch's own (`kong_counts`). Gradient
      accumulation passes those of the whole batch, so its micro-batches' losses sum to
      the batch's loss exactly.

  Returns:
    (loss, metrics): the summed loss, its terms and frame counts.
  """
  logits = out["logits"]
  mask = _crop_mask(batch)
  sums = {k: jnp.sum(binary_cross_entropy(logits[k], batch[k]) * mask) for k in ("onset", "offset", "frame")}
  sums["velocity"] = jnp.sum(binary_cross_entropy(logits["velocity"], batch["velocity"]) * batch["onset_mask"])
  loss, metrics = _terms(sums, kong_counts(batch) if counts is None else counts)
  return loss, dict(metrics, **_frame_counts(out, batch))


# HPPNet weights the positive term of its onset loss by 2.
HPPNET_ONSET_POSITIVE_WEIGHT = 2.0


def hppnet_counts(batch):
  """Normalisers of HPPNet's loss terms: all frames x keys, and onset frames for velocity."""
  cells = jnp.asarray(batch["frame"].size, jnp.float32)
  return {"onset": cells, "offset": cells, "frame": cells, "velocity": jnp.sum(batch["onset"])}


def hppnet_loss(out, batch, counts=None):
  """HPPNet's note loss. `out` holds the encoder's `logits` and `frame` probabilities.

  Args:
    out: encoder outputs.
    batch: targets (`rolls.hppnet_targets`).
    counts: the terms' normalisers; default this batch's own (`hppnet_counts`), see `kong_loss`.

  Returns:
    (loss, metrics): the summed loss, its terms and frame counts.
  """
  logits = out["logits"]
  sums = {
      "onset": jnp.sum(binary_cross_entropy(logits["onset"], batch["onset"], HPPNET_ONSET_POSITIVE_WEIGHT)),
      "offset": jnp.sum(binary_cross_entropy(logits["offset"], batch["offset"])),
      "frame": jnp.sum(binary_cross_entropy(logits["frame"], batch["frame"])),
  }
  velocity = jax.nn.sigmoid(logits["velocity"].astype(jnp.float32))
  sums["velocity"] = jnp.sum((batch["velocity"] - velocity) ** 2 * batch["onset"])
  loss, metrics = _terms(sums, hppnet_counts(batch) if counts is None else counts)
  return loss, dict(metrics, **_frame_counts(out, batch))


@dataclasses.dataclass(frozen=True)
class RollObjective:
  """An encoder's pretraining objective.

  Attributes:
    targets: (notes, start seconds, num_frames, fps) -> dict of float32 [frames, 88] targets.
    counts: batch of targets -> the loss terms' normalisers (they depend on the data only).
    loss: (encoder outputs, batch of targets, counts=None) -> (loss, metrics).
  """
  targets: Callable
  counts: Callable
  loss: Callable


_ROLL_OBJECTIVES = {
    "crnn": RollObjective(rolls.kong_targets, kong_counts, kong_loss),
    "hppnet": RollObjective(rolls.hppnet_targets, hppnet_counts, hppnet_loss),
}


def for_encoder(name: str) -> RollObjective:
  """The published pretraining objective of encoder `name` (`config.encoder.name`)."""
  if name not in _ROLL_OBJECTIVES:
    raise ValueError(f"unknown encoder {name!r}; valid: {', '.join(_ROLL_OBJECTIVES)}")
  return _ROLL_OBJECTIVES[name]


def token_counts(batch):
  """The token loss's normaliser: the number of target tokens (row t predicts token t + 1)."""
  return {"tokens": jnp.sum(batch["loss_mask"][:, 1:].astype(jnp.float32))}


def token_loss(logits, batch, counts=None):
  """Next-token cross-entropy on the stage's loss mask.

  Args:
    logits: [batch, length, vocab], row t predicting token t + 1.
    batch: "tokens" int [batch, length] and "loss_mask" [batch, length]
      (1 where the token is a prediction target).
    counts: the normaliser; default this batch's own (`token_counts`). Gradient
      accumulation passes the whole batch's, so micro-batch losses sum to its loss.

  Returns:
    (loss, metrics): the mean over target tokens; "accuracy" (greedy, over the same
    normaliser) and "tokens" (this batch's number of target tokens).
  """
  targets = batch["tokens"][:, 1:]  # [batch, len-1]
  weights = batch["loss_mask"][:, 1:]
  logits = logits[:, :-1].astype(jnp.float32)  # [batch, len-1, vocab]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  denom = jnp.maximum((token_counts(batch) if counts is None else counts)["tokens"], 1.0)
  loss = jnp.sum(ce * weights) / denom
  correct = (jnp.argmax(logits, -1) == targets) * weights
  return loss, {"accuracy": jnp.sum(correct) / denom, "tokens": jnp.sum(weights)}
