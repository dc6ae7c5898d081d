"""train.feature_pool: a frozen encoder's features encoded once, then decoder-only steps."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiermt import feature_pool
from hiermt import train
from hiermt.data import pipeline


@pytest.fixture(scope="module")
def setup(corpus_cache):
  from conftest import load_base_config  # pylint: disable=import-outside-toplevel
  config = load_base_config().get_config("onset_pitch,encoder=hppnet,runlocal")
  config.data.cache_dir = str(corpus_cache)
  config.freeze_encoder = True
  config.train.feature_pool = 5  # rounded up to whole batches: 3 batches of 2
  compiled = train.compile_steps(config, jax.devices()[:2])
  pool = feature_pool.FeaturePool(compiled.model, compiled.state, compiled.config, compiled.mesh)
  return compiled, pool


def _encode(compiled, audio):
  variables = {"params": compiled.state.params, "batch_stats": compiled.state.batch_stats}
  return np.asarray(compiled.model.apply(variables, jnp.asarray(audio, jnp.float32) / 32768.0, method="encode"))


def test_pool_holds_the_encoder_features_of_the_first_training_crops(setup):
  compiled, pool = setup
  stream = list(pipeline.make_dataset(compiled.config, "train", seed=compiled.config.seed, num_batches=3))
  assert len(pool.rows["features"]) == 6 and "audio" not in pool.rows
  for k, batch in enumerate(stream):
    rows = slice(2 * k, 2 * k + 2)
    np.testing.assert_array_equal(pool.rows["tokens"][rows], batch["tokens"])
    np.testing.assert_array_equal(pool.rows["loss_mask"][rows], batch["loss_mask"])
    np.testing.assert_allclose(pool.rows["features"][rows], _encode(compiled, batch["audio"]), rtol=1e-5, atol=1e-6)


def test_batches_depend_on_the_step_only_so_a_resumed_run_continues_exactly(setup):
  compiled, pool = setup
  resumed = feature_pool.FeaturePool(compiled.model, compiled.state, compiled.config, compiled.mesh, first_batch=3)
  fresh = [next(pool) for _ in range(5)]
  later = [next(resumed) for _ in range(2)]
  for a, b in zip(fresh[3:], later):
    jax.tree.map(np.testing.assert_array_equal, a, b)
  def rows_of(batch):  # which pool rows a batch holds (every crop's features differ)
    found = [[i for i, f in enumerate(pool.rows["features"]) if np.array_equal(f, x)] for x in batch["features"]]
    assert all(len(f) == 1 for f in found)
    for key, value in batch.items():  # every key from the same rows
      np.testing.assert_array_equal(value, pool.rows[key][[f[0] for f in found]])
    return [f[0] for f in found]
  drawn = [rows_of(b) for b in fresh]
  assert all(len(set(r)) == 2 for r in drawn)  # without replacement within a batch
  assert len({tuple(r) for r in drawn}) > 1  # and batch to batch, different rows


def test_a_features_batch_gives_the_loss_of_its_audio_batch(setup):
  compiled, _ = setup
  batch = next(iter(pipeline.make_dataset(compiled.config, "train", seed=7, num_batches=1)))
  batch.pop("truncated")
  from_audio = train.eval_step(compiled.model, compiled.config, compiled.state, batch)
  features = dict(batch, features=_encode(compiled, batch.pop("audio")))
  from_features = train.eval_step(compiled.model, compiled.config, compiled.state, features)
  assert float(from_audio["loss"]) > 1.0  # an untrained decoder: the comparison is not of zeros
  np.testing.assert_allclose(float(from_features["loss"]), float(from_audio["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(from_features["accuracy"]), float(from_audio["accuracy"]), rtol=1e-6)


def test_a_stage_trains_from_its_pool(runlocal_config, tmp_path):
  config = runlocal_config("velocity,encoder=hppnet", freeze_encoder=True, init_from="none",
                           **{"train.feature_pool": 4, "train.steps": 3, "train.eval_pieces": 0,
                              "train.eval_every": 3, "train.checkpoint_every": 3})
  train.run(config, str(tmp_path), jax.devices()[:2])
  lines = [json.loads(x) for x in (tmp_path / "velocity" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lines if r["split"] == "train"] == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) for r in lines)


@pytest.mark.parametrize("stage,frozen", [("encoder", True), ("onset_pitch", False)])
def test_a_pool_needs_an_lm_stage_over_a_frozen_encoder(runlocal_config, stage, frozen):
  config = runlocal_config(f"{stage},encoder=hppnet", freeze_encoder=frozen, **{"train.feature_pool": 8})
  with pytest.raises(ValueError, match="frozen encoder"):
    feature_pool.check(config)
  config.train.feature_pool = -1
  with pytest.raises(ValueError, match=">= 0"):
    feature_pool.check(config)
