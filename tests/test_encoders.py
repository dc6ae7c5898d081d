"""Tests for the roll-based encoders: sizes, frame rates, gradients, batch independence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiermt.models import hppnet
from hiermt.models import layers
from hiermt.models.crnn import CRNN
from hiermt.models.hppnet import HPPNet

ROLLS = ("frame", "onset", "offset", "velocity")
TINY = 0.125
# XLA:CPU compiles threefry random-number code slowly (seconds per parameter
# for a real init); an rbg key keeps these tests fast and changes nothing else.
RNG = jax.random.key(0, impl="rbg")


def _count(params):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def _abstract_init(model, samples):
  return jax.eval_shape(lambda: model.init(RNG, jnp.zeros((1, samples)), train=False))


def _tone_batch(batch, seconds, seed=0):
  """[batch, samples] of random piano-range tones with noise."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * 16000)) / 16000
  freqs = 440.0 * 2.0 ** ((rng.integers(21, 109, size=(batch, 3, 1)) - 69) / 12)
  y = np.sin(2 * np.pi * freqs * t).sum(axis=1) / 3 + 0.01 * rng.standard_normal((batch, len(t)))
  return jnp.asarray(y, jnp.float32)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _reference_rnn(kind, x, input_kernel, input_bias, recurrent_kernel, recurrent_bias):
  """PyTorch's GRU / LSTM equations, one direction, in numpy: [batch, time, in] -> [batch, time, hidden]."""
  hidden = recurrent_kernel.shape[0]
  h = c = np.zeros((x.shape[0], hidden))
  outputs = []
  for t in range(x.shape[1]):
    xg, hg = x[:, t] @ input_kernel + input_bias, h @ recurrent_kernel + recurrent_bias
    if kind == "gru":
      r = _sigmoid(xg[:, :hidden] + hg[:, :hidden])
      z = _sigmoid(xg[:, hidden:2 * hidden] + hg[:, hidden:2 * hidden])
      n = np.tanh(xg[:, 2 * hidden:] + r * hg[:, 2 * hidden:])
      h = (1 - z) * n + z * h
    else:
      i, f, g, o = np.split(xg + hg, 4, axis=-1)
      c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
      h = _sigmoid(o) * np.tanh(c)
    outputs.append(h)
  return np.stack(outputs, axis=1)


@pytest.mark.parametrize("kind,groups", [("gru", None), ("gru", 2), ("lstm", 3)])
def test_bidirectional_layers_match_reference_equations(kind, groups):
  layer = (layers.BiGRU if kind == "gru" else layers.BiLSTM)(4, groups=groups)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((groups or 1, 2, 6, 5)).astype(np.float32)  # [groups, batch, time, in]
  x_in = x if groups else x[0]
  shapes = layer.init(RNG, x_in)["params"]
  # Random values everywhere, biases included, so their placement is checked too.
  params = {k: rng.standard_normal(v.shape).astype(np.float32) * 0.5 for k, v in shapes.items()}
  out = np.asarray(layer.apply({"params": params}, x_in))
  out = out if groups else out[None]  # [groups, batch, time, 8]
  grouped = params if groups else {k: v[None] for k, v in params.items()}  # [groups, 2, ...]
  for g in range(groups or 1):
    for direction, half in ((0, slice(0, 4)), (1, slice(4, 8))):
      weights = [grouped[k][g, direction] for k in ("input_kernel", "input_bias", "recurrent_kernel",
                                                    "recurrent_bias")]
      inputs = x[g] if direction == 0 else x[g][:, ::-1]
      expected = _reference_rnn(kind, inputs, *weights)
      expected = expected if direction == 0 else expected[:, ::-1]
      np.testing.assert_allclose(out[g][..., half], expected, atol=1e-5, err_msg=f"group {g} direction {direction}")


@pytest.mark.parametrize("model,expected,tolerance", [
    (CRNN(), 20.22e6, 0.02),   # Kong et al. note model (PyTorch count)
    (HPPNet(), 1.24e6, 0.05),  # HPPNet-sp, official default configuration
])
def test_parameter_count_at_full_width(model, expected, tolerance):
  params = _abstract_init(model, 16000)["params"]
  assert _count(params) == pytest.approx(expected, rel=tolerance)


@pytest.mark.parametrize("model,frames", [(CRNN(width=TINY), 1001), (HPPNet(width=TINY), 501)])
def test_ten_second_segment_shapes(model, frames):
  audio = jax.ShapeDtypeStruct((2, 160000), jnp.float32)
  outputs, _ = jax.eval_shape(lambda x: model.init_with_output(RNG, x, train=False), audio)
  assert frames == 10 * model.FRAMES_PER_SECOND + 1
  assert set(outputs) == set(ROLLS) | {"features", "logits"}
  assert set(outputs["logits"]) == set(ROLLS)
  for name in ROLLS:
    assert outputs[name].shape == outputs["logits"][name].shape == (2, frames, 88), name
    assert outputs[name].dtype == outputs["logits"][name].dtype == jnp.float32
  assert outputs["features"].shape == (2, frames, model.feature_dim)


def test_feature_widths():
  assert CRNN().feature_dim == 1536
  assert CRNN(width=TINY).feature_dim == 3 * 2 * 32
  assert HPPNet().feature_dim == HPPNet(width=TINY).feature_dim == 352


@pytest.fixture(scope="module", params=[CRNN(width=TINY), HPPNet(width=TINY)], ids=["crnn", "hppnet"])
def initialised(request):
  """(model, variables, audio): a tiny encoder initialised on two 0.5 s clips."""
  model = request.param
  audio = _tone_batch(2, 0.5)
  return model, jax.jit(lambda x: model.init(RNG, x, train=False))(audio), audio


# Top-level modules the frame roll must not train: the other heads' branches
# (the CRNN's frame GRU sees onsets and offsets only through stop_gradient).
NOT_TRAINED_BY_FRAME_LOSS = {
    CRNN: ("onset_model", "offset_model", "velocity_model", "onset_gru", "onset_gru_fc", "onset_fc", "offset_fc",
           "velocity_fc"),
    HPPNet: ("onset_subnet",),
}


def test_training_gradients(initialised):
  model, variables, audio = initialised

  def losses(params, audio):
    """[total loss, frame-roll loss] and the forward pass's outputs."""
    outputs, updates = model.apply(variables | {"params": params}, audio, train=True, mutable=["batch_stats"],
                                   rngs={"dropout": RNG})
    total = sum(jnp.mean(outputs[k]) for k in ROLLS) + jnp.mean(jnp.square(outputs["features"]))
    return jnp.stack([total, jnp.mean(outputs["frame"])]), (outputs, updates)

  # Both gradients from one batched backward pass. Audio is an argument, not a
  # closed-over constant, or XLA constant-folds the front end while compiling.
  both, (outputs, updates) = jax.jit(jax.jacrev(losses, has_aux=True))(variables["params"], audio)
  # The checks below run in numpy: on device, every op on each leaf's shape would compile on its own.
  both, outputs = jax.device_get((both, outputs))
  total, frame = jax.tree.map(lambda g: g[0], both), jax.tree.map(lambda g: g[1], both)
  for name in ROLLS:
    assert bool(np.all((outputs[name] > 0) & (outputs[name] < 1))), name

  # Every parameter is trained, with finite gradients.
  norms = {jax.tree_util.keystr(path): float(np.linalg.norm(g)) for path, g in jax.tree.leaves_with_path(total)}
  assert all(np.isfinite(n) for n in norms.values())
  assert [k for k, n in norms.items() if n == 0.0] == []

  # The frame roll's loss trains its own branch only.
  excluded = NOT_TRAINED_BY_FRAME_LOSS[type(model)]
  assert set(excluded) <= set(frame)
  for module, subtree in frame.items():
    trained = any(bool(np.any(g != 0)) for g in jax.tree.leaves(subtree))
    if module in excluded:
      assert not trained, module
    elif module.startswith("frame"):
      assert trained, module

  if "batch_stats" in variables:  # training updates the running statistics
    before, after = jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(updates["batch_stats"])
    assert all(not np.allclose(a, b) for a, b in zip(before, after, strict=True))


def test_eval_outputs_do_not_depend_on_the_batch(initialised):
  # Running statistics (CRNN), per-example normalisation (HPPNet) and a
  # per-example CQT floor: an example's output does not depend on its neighbours.
  model, variables, audio = initialised
  forward = jax.jit(lambda x: model.apply(variables, x, train=False))
  together = forward(audio)
  # Same batch shape (one compile): the first example beside silence.
  alone = forward(jnp.concatenate([audio[:1], jnp.zeros_like(audio[:1])]))
  for name in (*ROLLS, "features"):
    np.testing.assert_allclose(alone[name][0], together[name][0], atol=1e-5, err_msg=name)
  assert not np.allclose(together["features"][0], together["features"][1])


def test_bfloat16_hppnet_inference_is_finite_and_close_to_float32():
  # Under jit, XLA:CPU fused the trunk's bfloat16 convolutions into the pitch pooling's fusion and
  # returned -inf rolls; width 1/4 (32 channels) on one second reproduces it, narrower widths do not.
  audio = _tone_batch(1, 1.0)
  f32, bf16 = HPPNet(width=0.25), HPPNet(width=0.25, dtype=jnp.bfloat16)
  variables = jax.jit(lambda x: f32.init(RNG, x, train=False))(audio)
  reference = jax.jit(lambda v, x: f32.apply(v, x, train=False))(variables, audio)
  got = jax.jit(lambda v, x: bf16.apply(v, x, train=False))(variables, audio)
  for name in ROLLS:
    assert bool(jnp.all(jnp.isfinite(got[name]))), name
    np.testing.assert_allclose(got[name], reference[name], atol=0.05, err_msg=name)


def _harmonic_reference(x, kernels):
  """Sum of HPPNet's [1 x 3] harmonic convs by loops: out[f] = sum_k,j x[f + (j - 1) d_k] @ kernels[k, j]."""
  out = np.zeros(x.shape[:3] + (kernels.shape[-1],))
  bins = x.shape[2]
  for k, d in enumerate(hppnet.HARMONIC_DILATIONS):
    for j in range(3):
      for f in range(bins):
        g = f + (j - 1) * d
        if 0 <= g < bins:
          out[:, :, f] += x[:, :, g] @ kernels[k, j]
  return out


def test_both_forms_of_the_harmonic_convolutions_are_the_summed_dilated_convs():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 2, 352, 2)).astype(np.float32)  # [batch, time, bins, in]
  kernels = rng.normal(size=(8, 3, 2, 3)).astype(np.float32)  # [harmonics, taps, in, out]
  want = _harmonic_reference(x, kernels)
  assert hppnet.HARMONIC_DILATIONS == (48, 76, 96, 111, 124, 135, 144, 152)
  for form in (hppnet._harmonic_convs, hppnet._harmonic_matmul):
    np.testing.assert_allclose(form(x, kernels), want, rtol=1e-4, atol=1e-4, err_msg=form.__name__)
  # A single impulse at bin 200 through harmonic 2 (dilation 96), tap 0: it reaches bin 200 + 96.
  impulse = np.zeros((1, 1, 352, 1), np.float32)
  impulse[0, 0, 200] = 1.0
  only = np.zeros((8, 3, 1, 1), np.float32)
  only[2, 0] = 1.0
  for form in (hppnet._harmonic_convs, hppnet._harmonic_matmul):
    assert np.flatnonzero(np.asarray(form(impulse, only))[0, 0, :, 0]).tolist() == [296]
  # The matmul form, used in training, has the gradients of the convs.
  cotangent = rng.normal(size=want.shape).astype(np.float32)
  grads = [jax.grad(lambda a, k, form=form: jnp.vdot(form(a, k), cotangent), argnums=(0, 1))(x, kernels)
           for form in (hppnet._harmonic_convs, hppnet._harmonic_matmul)]
  for got, ref in zip(grads[1], grads[0]):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_hppnet_train_flag_changes_no_output():
  """`train` only picks the forms of the harmonic convolutions and the pitch pooling; rolls and gradients stay."""
  audio = _tone_batch(2, 1.0)
  model = HPPNet(width=TINY)
  variables = jax.jit(lambda x: model.init(RNG, x, train=False))(audio)

  def loss(v, train):
    return model.apply(v, audio, train=train)["logits"]["frame"].mean()

  rolls = {t: jax.jit(lambda v, x, t=t: model.apply(v, x, train=t))(variables, audio) for t in (False, True)}
  for name in ROLLS:
    np.testing.assert_allclose(rolls[True][name], rolls[False][name], atol=1e-5, err_msg=name)
  want, got = (jax.jit(jax.grad(lambda v, t=t: loss(v, t)))(variables) for t in (False, True))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)
