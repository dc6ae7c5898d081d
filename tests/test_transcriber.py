"""Tests for the stage models built from the config, and their `benchmark --what=params` report."""

import json

from absl import app
from absl import flags
from absl.testing import flagsaver
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from hiermt.benchmark import cli
from hiermt.benchmark import params
from hiermt import vocabulary
from hiermt.models import transcriber

BATCH, SAMPLES, TOKENS = 2, 4000, 16
# Paper Table II decoder sizes in millions of parameters (two decimals), audio projection excluded.
PAPER_MILLIONS = {"tiny": 14.93, "small": 44.42, "base": 79.67, "large": 156.76}


def _inputs():
  audio = 0.1 * jax.random.normal(jax.random.key(0), (BATCH, SAMPLES))
  tokens = jax.random.randint(jax.random.key(1), (BATCH, TOKENS), 0, vocabulary.VOCAB_SIZE)
  return audio, tokens


def _variables(model, *inputs):
  """Random variables of the right structure, made without compiling `init`.

  Compiling the encoders' initialisers takes far longer than these checks;
  any well-scaled values do for them.
  """
  abstract = jax.eval_shape(lambda k: model.init({"params": k, "dropout": k}, *inputs, train=False),
                            jax.random.key(0))
  rng = np.random.default_rng(0)
  leaves, treedef = jax.tree.flatten_with_path(abstract)
  values = [np.ones(leaf.shape, leaf.dtype) if path[-1].key == "var"
            else (0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype) for path, leaf in leaves]
  return jax.tree.unflatten(treedef, values)


@pytest.mark.parametrize("stage", base.STAGES)
def test_build_model_maps_the_config(stage):
  config = base.get_config(f"{stage},encoder=hppnet,size=micro,conditioning=cross,runlocal")
  config.train.dtype, config.train.remat, config.freeze_encoder = "bfloat16", True, True
  model = transcriber.build_model(config)
  assert model.encoder.width == config.encoder.width and model.encoder.dtype == jnp.bfloat16
  if stage == "encoder":
    assert model.decoder is None
    return
  d = model.decoder
  assert (d.num_layers, d.num_heads, d.dim) == base.DECODER_SIZES["micro"][:3]
  assert (d.max_len, d.conditioning) == (config.data.max_tokens, "cross")
  assert d.prefix_pool == config.decoder.prefix_pool
  assert d.vocab_size == vocabulary.VOCAB_SIZE and d.dtype == jnp.bfloat16 and d.remat
  assert model.freeze_encoder


@pytest.mark.parametrize("encoder,per_token", [("crnn", 0.25), ("hppnet", 0.125)])
def test_time_init_maps_10ms_time_tokens_to_pooled_prefix_frames(encoder, per_token):
  # Pool 4 (runlocal): CRNN 100 frames/s -> 25 prefix positions/s, 0.25 per 10 ms token;
  # HPPNet 50 frames/s -> 0.125.
  config = base.get_config(f"velocity,encoder={encoder},runlocal")
  decoder = transcriber.build_decoder(config)
  assert decoder.time_tokens == (vocabulary.TIME_OFFSET, 1001, per_token)
  assert not decoder.time_init and not decoder.rope_time
  del config.decoder["time_init"], config.decoder["rope_time"]  # a config.json saved before the options existed
  assert not transcriber.build_decoder(config).time_init
  # rope_time was a switch before it became a share: a saved True means every rotated feature.
  config.decoder.time_init = config.decoder.rope_time = True
  assert transcriber.build_decoder(config).time_init and transcriber.build_decoder(config).rope_time == 1.0


@pytest.mark.parametrize("arg", ["encoder,runlocal", "encoder,encoder=hppnet,runlocal", "onset_pitch,runlocal",
                                 "velocity,encoder=hppnet,runlocal", "offset,conditioning=cross,runlocal"])
def test_stage_models_produce_the_right_shapes(arg):
  config = base.get_config(arg)
  model = transcriber.build_model(config)
  audio, tokens = _inputs()
  inputs = (audio,) if config.stage == "encoder" else (audio, tokens)
  variables = jax.eval_shape(lambda k: model.init({"params": k, "dropout": k}, *inputs, train=False),
                             jax.random.key(0))
  out = jax.eval_shape(lambda v: model.apply(v, *inputs, train=True, rngs={"dropout": jax.random.key(0)},
                                             mutable=["batch_stats"])[0], variables)
  if config.stage == "encoder":
    assert set(variables["params"]) == {"encoder"}
    for head in ("frame", "onset", "offset", "velocity"):
      assert out[head].shape[0] == BATCH and out[head].shape[2] == 88
  else:
    assert set(variables["params"]) == {"encoder", "decoder"}
    assert out.shape == (BATCH, TOKENS, vocabulary.VOCAB_SIZE) and out.dtype == jnp.float32


def test_kv_cached_decode_matches_teacher_forcing():
  model = transcriber.build_model(base.get_config("flatten,runlocal"))
  audio, tokens = _inputs()
  variables = _variables(model, audio, tokens)
  expected = jax.jit(lambda v: model.apply(v, audio, tokens, train=False))(variables)
  features = jax.jit(lambda v: model.apply(v, audio, method=model.encode))(variables)
  step = jax.jit(lambda cache, t, f: model.apply({**variables, "cache": cache}, t, f, method=model.decode,
                                                 mutable=["cache"]))
  first, mutated = step(model.init_cache(features), tokens[:, :5], features)
  rest, _ = step(mutated["cache"], tokens[:, 5:], None)
  np.testing.assert_allclose(jnp.concatenate([first, rest], axis=1), expected, rtol=1e-4, atol=1e-4)


class _ToyEncoder(nn.Module):
  """Stands in for CRNN/HPPNet: one Dense layer, and a statistic counting training-mode calls."""

  @nn.compact
  def __call__(self, audio, *, train):
    frames = audio.reshape(audio.shape[0], -1, 100)  # [batch, frames, 100]
    calls = self.variable("batch_stats", "train_calls", lambda: jnp.zeros((), jnp.int32))
    if train:
      calls.value += 1
    return {"features": nn.Dense(8)(frames)}


@pytest.mark.parametrize("freeze", [True, False])
def test_encoder_is_fine_tuned_unless_frozen(freeze):
  config = base.get_config("velocity,runlocal")
  model = transcriber.Transcriber(_ToyEncoder(), transcriber.build_decoder(config), freeze_encoder=freeze)
  audio, tokens = _inputs()
  variables = _variables(model, audio, tokens)

  def loss(params):
    logits, updates = model.apply({**variables, "params": params}, audio, tokens, train=True,
                                  mutable=["batch_stats"])
    return jnp.mean(logits ** 2), updates

  grads, updates = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
  assert any(np.any(g) for g in jax.tree.leaves(grads["decoder"]))
  assert any(np.any(g) for g in jax.tree.leaves(grads["encoder"])) == (not freeze)
  assert int(updates["batch_stats"]["encoder"]["train_calls"]) == (0 if freeze else 1)


def test_bad_calls_raise_clear_errors():
  audio, tokens = _inputs()
  encoder_model = transcriber.build_model(base.get_config("encoder,runlocal"))
  with pytest.raises(ValueError, match="audio only"):
    jax.eval_shape(lambda k: encoder_model.init(k, audio, tokens, train=False), jax.random.key(0))
  lm_model = transcriber.build_model(base.get_config("onset_pitch,runlocal"))
  with pytest.raises(ValueError, match="need tokens"):
    jax.eval_shape(lambda k: lm_model.init(k, audio, train=False), jax.random.key(0))
  config = base.get_config("onset_pitch,runlocal")
  config.train.dtype = "float16"
  with pytest.raises(ValueError, match="train.dtype"):
    transcriber.build_model(config)


def _run_benchmark(what):
  """Runs `python -m hiermt.benchmark --what=WHAT` in-process."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(what=what):
    cli.main([])


def test_benchmark_params_reports_counts_and_flops(capsys):
  _run_benchmark("params")
  report = json.loads(capsys.readouterr().out)
  assert set(report["encoder"]) == set(base.ENCODERS) and min(report["encoder"].values()) > 0
  for conditioning in base.CONDITIONINGS:
    assert set(report["decoder"][conditioning]) == set(base.DECODER_SIZES)
  for size, millions in PAPER_MILLIONS.items():
    assert report["decoder"]["prefix"][size] / 1e6 == pytest.approx(millions, abs=0.005)
    # Cross-attention adds an attention block and an MLP per layer.
    assert report["decoder"]["cross"][size] > 1.8 * report["decoder"]["prefix"][size]
  assert report["encoder_features"]["crnn"] == {"frames": 1001, "dim": 1536}
  assert report["encoder_features"]["hppnet"] == {"frames": 501, "dim": 352}
  for name in base.ENCODERS:
    flops = report["flops"]["decoder"][name]
    assert report["flops"]["encoder"][name] > 0
    assert flops["tiny"] < flops["small"] < flops["base"] < flops["large"]
    # Forward matmuls cost about 2 x parameters per position, plus attention.
    positions = report["encoder_features"][name]["frames"] + params.FLOPS_TOKENS
    assert flops["base"] > 0.9 * 2 * report["decoder"]["prefix"]["base"] * positions


def test_benchmark_rejects_an_unknown_mode():
  with pytest.raises(app.UsageError, match="--what"):
    _run_benchmark("nonsense")
