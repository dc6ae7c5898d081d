"""Tests for the training objectives (hand-computed losses), the schedules and the optimizers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_base_config
from hiermt import notes
from hiermt import objectives
from hiermt import train
from hiermt import vocabulary as vocab

LOG2 = math.log(2.0)


def _logit(p):
  return math.log(p / (1 - p))


def test_binary_cross_entropy_values_and_gradient_of_a_confident_error():
  bce = objectives.binary_cross_entropy
  np.testing.assert_allclose(bce(jnp.float32(0.0), 1.0), LOG2, rtol=1e-6)
  np.testing.assert_allclose(bce(jnp.float32(_logit(0.8)), 0.25), -(0.25 * math.log(0.8) + 0.75 * math.log(0.2)),
                             rtol=1e-5)
  np.testing.assert_allclose(bce(jnp.float32(0.0), 1.0, positive_weight=2.0), 2 * LOG2, rtol=1e-6)
  # A confident false positive in bfloat16: the loss is its true value and the gradient is sigmoid(x) - y.
  logit = jnp.asarray(12.0, jnp.bfloat16)
  loss, grad = jax.value_and_grad(lambda x: bce(x, 0.0))(logit)
  np.testing.assert_allclose(float(loss), 12.0 + math.log1p(math.exp(-12.0)), rtol=1e-5)
  assert float(grad) > 0.99


def _roll(values):
  """[1, frames, 88] with `values` (list over frames) on key 0 and 0.5-probability logits elsewhere."""
  out = np.zeros((1, len(values), 88), np.float32)
  out[0, :, 0] = values
  return jnp.asarray(out)


def test_kong_loss_by_hand():
  frames = 2
  logits = {k: _roll([0.0, 0.0]) for k in ("onset", "offset", "frame", "velocity")}
  batch = {k: _roll([1.0, 0.0]) for k in ("onset", "offset", "frame")}
  batch["velocity"] = _roll([0.5, 0.0])
  batch["onset_mask"] = _roll([1.0, 0.0])
  batch["mask"] = jnp.ones((1, frames, 88))
  out = {"logits": logits, "frame": jax.nn.sigmoid(logits["frame"])}
  loss, metrics = objectives.kong_loss(out, batch)
  # Every logit is 0: BCE is log 2 whatever the target; velocity is averaged over its one onset frame.
  for key in ("onset", "offset", "frame", "velocity"):
    np.testing.assert_allclose(metrics[f"loss_{key}"], LOG2, rtol=1e-6)
  np.testing.assert_allclose(loss, 4 * LOG2, rtol=1e-6)
  # The crop mask removes frames of a note begun before the crop.
  batch["mask"] = batch["mask"].at[0, 0, 0].set(0.0)
  logits["onset"] = logits["onset"].at[0, 1, 0].set(_logit(0.75))
  _, metrics = objectives.kong_loss(out, batch)
  expected = ((2 * 88 - 2) * LOG2 + -math.log(0.25)) / (2 * 88 - 1)
  np.testing.assert_allclose(metrics["loss_onset"], expected, rtol=1e-5)


def test_hppnet_loss_by_hand():
  logits = {k: _roll([_logit(0.8), _logit(0.2)]) for k in ("onset", "offset", "frame")}
  logits["velocity"] = _roll([_logit(0.5), _logit(0.9)])
  batch = {k: _roll([1.0, 0.0]) for k in ("onset", "offset", "frame")}
  batch["velocity"] = _roll([0.75, 0.9])
  out = {"logits": logits, "frame": jax.nn.sigmoid(logits["frame"])}
  loss, metrics = objectives.hppnet_loss(out, batch)
  # Key 0: frame 0 is a hit at 0.8, frame 1 a true negative at 0.2; the other 87 keys have logit 0, target 0.
  cells = 2 * 88
  plain = (2 * -math.log(0.8) + 174 * LOG2) / cells
  onset = (2 * -math.log(0.8) + -math.log(0.8) + 174 * LOG2) / cells  # positive term weighted 2
  np.testing.assert_allclose(metrics["loss_onset"], onset, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_offset"], plain, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_frame"], plain, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_velocity"], (0.75 - 0.5) ** 2, rtol=1e-5)  # onset frames only
  np.testing.assert_allclose(loss, onset + 2 * plain + 0.0625, rtol=1e-5)
  batch["onset"] = jnp.zeros_like(batch["onset"])
  assert float(objectives.hppnet_loss(out, batch)[1]["loss_velocity"]) == 0.0


def test_micro_batch_losses_over_the_whole_batch_counts_add_up_to_its_loss():
  """Velocity is a mean over onset frames: row 0 has one, row 1 three. Each row's loss over the
  two rows' counts (1 + 3 onsets) sums to the batch's loss; each row's own mean would not."""
  velocity_logits = np.zeros((2, 4, 88), np.float32)
  velocity_logits[0, 0, 0] = _logit(0.9)  # row 0: squared error (0.5 - 0.9)^2 = 0.16 at its onset
  onset = np.zeros((2, 4, 88), np.float32)
  onset[0, 0, 0] = onset[1, 0, 0] = onset[1, 1, 0] = onset[1, 2, 0] = 1.0
  batch = {"onset": jnp.asarray(onset), "offset": jnp.zeros((2, 4, 88)), "frame": jnp.zeros((2, 4, 88)),
           "velocity": jnp.asarray(onset * 0.5)}  # row 1: three onsets predicted exactly (0.5)
  logits = {k: jnp.zeros((2, 4, 88)) for k in ("onset", "offset", "frame")}
  logits["velocity"] = jnp.asarray(velocity_logits)
  out = {"logits": logits, "frame": jax.nn.sigmoid(logits["frame"])}
  whole_loss, whole = objectives.hppnet_loss(out, batch)
  np.testing.assert_allclose(whole["loss_velocity"], 0.16 / 4, rtol=1e-5)
  counts = objectives.hppnet_counts(batch)
  assert float(counts["velocity"]) == 4.0 and float(counts["frame"]) == 2 * 4 * 88
  rows = [jax.tree.map(lambda x, r=r: x[r:r + 1], (out, batch)) for r in (0, 1)]
  parts = [objectives.hppnet_loss(o, b, counts) for o, b in rows]
  np.testing.assert_allclose(sum(p[0] for p in parts), whole_loss, rtol=1e-6)
  np.testing.assert_allclose(sum(p[1]["loss_velocity"] for p in parts), 0.16 / 4, rtol=1e-5)
  own = [objectives.hppnet_loss(o, b)[1]["loss_velocity"] for o, b in rows]  # each row's own mean
  np.testing.assert_allclose(own, [0.16, 0.0], atol=1e-6)


def test_each_encoder_gets_its_own_objective():
  assert objectives.for_encoder("crnn").loss is objectives.kong_loss
  assert objectives.for_encoder("hppnet").loss is objectives.hppnet_loss
  with pytest.raises(ValueError, match="valid: crnn, hppnet"):
    objectives.for_encoder("unet")


def test_token_loss_counts_only_masked_targets():
  # Row t predicts token t + 1; the mask of token t + 1 decides whether row t counts.
  tokens = jnp.asarray([[1, 5, 10, 20, 2]])
  mask = jnp.asarray([[0, 0, 1, 0, 1]], jnp.float32)
  logits = jnp.zeros((1, 5, 30)).at[0, 1, 10].set(math.log(29.0))  # row 1: p(10) = 29 / 58 = 0.5
  loss, metrics = objectives.token_loss(logits, {"tokens": tokens, "loss_mask": mask})
  np.testing.assert_allclose(loss, (LOG2 + math.log(30.0)) / 2, rtol=1e-6)  # rows 1 and 3
  assert float(metrics["tokens"]) == 2.0 and float(metrics["accuracy"]) == 0.5


def test_velocity_stage_trains_only_velocity_slots():
  piece = notes.Notes.create([0.5, 1.0, 1.0], [1.5, 2.0, 3.0], [60, 62, 64], [30, 60, 90])
  tokens, mask = vocab.encode_segment(piece, 0.0, "velocity")
  tokens, mask = jnp.asarray(tokens)[None], jnp.asarray(mask, jnp.float32)[None]
  logits = jax.random.normal(jax.random.key(0), (1, tokens.shape[1], vocab.VOCAB_SIZE))
  grad = jax.grad(lambda x: objectives.token_loss(x, {"tokens": tokens, "loss_mask": mask})[0])(logits)
  trained_rows = np.flatnonzero(np.abs(np.asarray(grad[0])).sum(-1) > 0)
  targets = np.asarray(tokens[0, trained_rows + 1])
  assert len(trained_rows) == 4  # three velocities and <eos>
  assert np.all((targets >= vocab.VELOCITY_OFFSET) | (targets == vocab.EOS))


def test_moving_average_update_ramps_its_decay_up():
  ema, params = {"w": jnp.float32(2.0)}, {"w": jnp.float32(4.0)}
  # Step 0: d = 0, the average starts as the parameters; step 10: d = min(0.99, 10 / 20) = 0.5;
  # step 1000: d = min(0.99, 1000 / 1010) = 0.99.
  for step, want in ((0, 4.0), (10, 3.0), (1000, 0.99 * 2.0 + 0.01 * 4.0)):
    np.testing.assert_allclose(train.ema_update(ema, params, step, 0.99)["w"], want, rtol=1e-6)
  np.testing.assert_allclose(train.ema_update(ema, params, 1000, 0.5)["w"], 3.0, rtol=1e-6)
  # A parameter that does not move keeps its exact value (a frozen encoder in the average).
  x = jnp.float32(0.1234567)
  assert train.ema_update({"w": x}, {"w": x}, 7, 0.99)["w"] == x


def test_eval_loss_and_weights_read_the_moving_average():
  config = load_base_config().get_config("onset_pitch,runlocal")
  seen = []

  class Recorder:
    def apply(self, variables, *args, **kwargs):
      seen.append(variables["params"])
      return jnp.zeros((1, 3, vocab.VOCAB_SIZE))

  batch = {"tokens": jnp.ones((1, 3), jnp.int32), "loss_mask": jnp.ones((1, 3)), "features": jnp.zeros((1, 4, 8))}
  raw, average = {"w": jnp.ones(2)}, {"w": jnp.zeros(2)}
  state = train.TrainState(step=jnp.asarray(0), params=raw, batch_stats={}, opt_state=(), ema_params=average)
  train.eval_step(Recorder(), config, state, batch)
  assert seen[-1] is average and state.weights() is average
  plain = state.replace(ema_params={})
  train.eval_step(Recorder(), config, plain, batch)
  assert seen[-1] is raw and plain.weights() is raw


def _schedule(arg, **train_fields):
  config = load_base_config().get_config(arg)
  config.train.update(train_fields)
  return train.learning_rate_schedule(config)


def test_encoder_recipes_follow_their_authors():
  crnn = load_base_config().get_config("encoder").train
  assert (crnn.optimizer, crnn.lr, crnn.weight_decay, crnn.grad_clip) == ("amsgrad", 5e-4, 0.0, 0.0)
  hpp = load_base_config().get_config("encoder,encoder=hppnet").train
  assert (hpp.optimizer, hpp.lr, hpp.decay_rate, hpp.grad_clip) == ("adam", 6e-4, 0.98, 0.0)
  lm = load_base_config().get_config("velocity").train
  assert (lm.optimizer, lm.lr, lm.weight_decay, lm.decay) == ("adamw", 1e-4, 0.01, "constant")
  schedule = _schedule("encoder")
  for step, lr in ((0, 5e-4), (9_999, 5e-4), (10_000, 4.5e-4), (25_000, 5e-4 * 0.81)):
    np.testing.assert_allclose(schedule(step), lr, rtol=1e-6)
  np.testing.assert_allclose(_schedule("encoder,encoder=hppnet")(20_000), 6e-4 * 0.98**2, rtol=1e-6)


def test_warmup_then_cosine_schedule():
  schedule = _schedule("velocity", decay="cosine", warmup_steps=100, steps=1100)
  np.testing.assert_allclose([schedule(0), schedule(50), schedule(100), schedule(600), schedule(1100)],
                             [0.0, 5e-5, 1e-4, 5e-5, 0.0], atol=1e-10)


def test_weight_decay_skips_biases_and_norm_scales():
  config = load_base_config().get_config("velocity")
  config.train.update(lr=0.1, weight_decay=0.5, grad_clip=0.0)
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "norm": {"scale": jnp.ones(2)},
            "embed": {"embedding": jnp.ones((3, 2))}, "gru": {"input_kernel": jnp.ones((2, 3))}}
  tx = train.make_optimizer(config)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  for path in (("dense", "kernel"), ("embed", "embedding"), ("gru", "input_kernel")):
    np.testing.assert_allclose(new[path[0]][path[1]], 1 - 0.1 * 0.5)
  for path in (("dense", "bias"), ("norm", "scale")):
    np.testing.assert_allclose(new[path[0]][path[1]], 1.0)
  config.train.optimizer = "amsgrad"
  with pytest.raises(ValueError, match="weight_decay"):
    train.make_optimizer(config)


@pytest.mark.parametrize("encoder", ["crnn", "hppnet"])
def test_bfloat16_encoder_keeps_float32_logits_and_trains_like_float32(encoder):
  from hiermt.models import transcriber
  rng = np.random.default_rng(0)
  audio = jnp.asarray(rng.uniform(-0.3, 0.3, (2, 16000)).astype(np.float32))
  piece = notes.Notes.create([0.1, 0.4], [0.6, 0.9], [60, 67], [80, 40])
  models = {}
  for dtype in ("float32", "bfloat16"):
    config = load_base_config().get_config(f"encoder,runlocal,encoder={encoder}")
    config.train.dtype = dtype
    models[dtype] = transcriber.build_model(config)
  fps = type(models["float32"].encoder).FRAMES_PER_SECOND
  targets = objectives.for_encoder(encoder).targets(piece, 0.0, fps + 1, fps)
  batch = {k: jnp.asarray(np.stack([v, v])) for k, v in targets.items()}
  # Parameters are float32 whatever the compute dtype: both runs start from one initialisation,
  # jitted (run op by op, every op of the encoders would compile on its own).
  variables = jax.jit(lambda key: models["float32"].init(key, audio, train=False))(jax.random.key(0))
  other = {k: v for k, v in variables.items() if k != "params"}
  tx = optax.adam(3e-3)
  final = {}
  for dtype, model in models.items():
    out = jax.eval_shape(lambda v: model.apply(v, audio, train=False), variables)
    assert all(v.dtype == jnp.float32 for v in out["logits"].values())

    def loss_fn(params, audio, batch):
      out = model.apply({"params": params, **other}, audio, train=False)
      return objectives.for_encoder(encoder).loss(out, batch)[0]

    @jax.jit
    def step(params, opt_state, audio, batch):
      loss, grads = jax.value_and_grad(loss_fn)(params, audio, batch)
      updates, opt_state = tx.update(grads, opt_state, params)
      return loss, optax.apply_updates(params, updates), opt_state

    params, opt_state, losses = variables["params"], tx.init(variables["params"]), []
    for _ in range(8):
      loss, params, opt_state = step(params, opt_state, audio, batch)
      losses.append(float(loss))
    final[dtype] = losses
  assert final["bfloat16"][-1] < 0.9 * final["bfloat16"][0]
  np.testing.assert_allclose(final["bfloat16"], final["float32"], rtol=0.1)
