"""A frozen encoder's features of a fixed set of training crops, encoded once (`train.feature_pool`).

An LM step over a frozen encoder spends most of its time in the encoder's forward
pass (CPU recipe, HPPNet at width 1/4 and the micro decoder: 1.27 s of a 1.38 s
step), and the decoder needs many distinct examples: repeating each batch for
several decoder updates learned less than plain steps did. With
`train.feature_pool = N` a stage encodes the first N crops of its ordinary
training stream once (augmentation included) and then trains the decoder on
random batches drawn from them, each step costing the decoder alone.

Batch k is a pure function of (seed, k) and the pool is rebuilt identically on
resume, so a resumed run continues exactly. Each process keeps the rows of the
crops it loaded and draws its slice of every batch from them.
"""

import math
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import tqdm

from hiermt import partitioning
from hiermt.data import pipeline

# Keeps the pool's batch draws apart from every other use of the seed.
_DRAW_STREAM = 0x9F00


def check(config):
  """Raises ValueError unless `train.feature_pool` fits the stage (an LM stage over a frozen encoder)."""
  size = config.train.feature_pool
  if size < 0:
    raise ValueError(f"train.feature_pool={size} must be >= 0 (0: encode every batch)")
  if size and (config.stage == "encoder" or not config.freeze_encoder):
    raise ValueError(f"train.feature_pool={size} needs an LM stage over a frozen encoder "
                     f"(stage {config.stage!r}, freeze_encoder={config.freeze_encoder}): only then are the "
                     "features of a crop the same at every step. Set --config.freeze_encoder=True or "
                     "--config.train.feature_pool=0.")


class FeaturePool:
  """An endless iterator of this process's training batches `{features, tokens, loss_mask, truncated}`.

  Attributes:
    rows: this process's pooled crops, as numpy arrays with a leading row axis.
  """

  def __init__(self, model, state, config, mesh, *, first_batch=0):
    """Encodes the pool with `state`'s encoder.

    Args:
      model: the stage's `Transcriber`.
      state: train state holding the frozen encoder's parameters and statistics.
      config: the run config (`Compiled.config`: its batch fits the mesh).
      mesh: the training mesh; the pool is encoded split over it.
      first_batch: index of the first batch `next` returns (the step a run resumes at).
    """
    check(config)
    global_batch = config.train.batch_size
    num_batches = math.ceil(config.train.feature_pool / global_batch)
    self._seed = config.seed
    self._next = first_batch
    self._per_process = global_batch // jax.process_count()
    batch_sh = partitioning.batch_sharding(mesh)
    encode = jax.jit(lambda variables, audio: model.apply(variables, audio.astype(jnp.float32) / 32768.0,
                                                          method="encode"), out_shardings=batch_sh)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    dataset = pipeline.make_dataset(config, config.data.train_split, seed=config.seed, num_batches=num_batches)
    logging.info("feature pool: encoding %d training crops once (train.feature_pool=%d)…",
                 num_batches * global_batch, config.train.feature_pool)
    start = time.time()
    parts = []
    batches = iter(dataset)
    try:
      for local in tqdm.tqdm(batches, total=num_batches, desc="feature pool", unit="batch",
                             disable=jax.process_index() != 0):
        audio = local.pop("audio")
        features = encode(variables, partitioning.global_batch(mesh, {"audio": audio})["audio"])
        # [local rows, frames, d_enc]: this process's rows, in the order it loaded them
        local["features"] = np.asarray(multihost_utils.global_array_to_host_local_array(
            features, mesh, batch_sh.spec))
        parts.append(local)
    finally:
      if hasattr(batches, "close"):  # Grain worker processes and their shared memory
        batches.close()
    self.rows = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    logging.info("feature pool: %d crops in %.0f s (%.2f GB on this host)", len(self.rows["features"]) *
                 jax.process_count(), time.time() - start, sum(v.nbytes for v in self.rows.values()) / 1e9)

  def __iter__(self):
    return self

  def __next__(self):
    """Batch `k` (k = first_batch, first_batch + 1, ...): rows drawn without replacement by (seed, k)."""
    rng = np.random.default_rng((self._seed, self._next, _DRAW_STREAM))
    self._next += 1
    rows = rng.choice(len(self.rows["features"]), size=self._per_process, replace=False)
    return {key: value[rows] for key, value in self.rows.items()}
