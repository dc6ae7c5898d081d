"""`--what=params`: parameter counts and forward FLOPs, from shapes alone.

Shapes come from `jax.eval_shape` / `jax.make_jaxpr`, so no weights are
allocated and the report takes seconds even for the large sizes. The helpers
that build a bare encoder or decoder of a named size serve the other modes too.
"""

import jax
import jax.numpy as jnp

from configs import base
from hiermt import flops
from hiermt import vocabulary
from hiermt.models import decoder as decoder_lib
from hiermt.models import transcriber

# FLOPs are quoted for the onset stage's longest sequence.
FLOPS_TOKENS = 1024


def segment_audio(batch=1):
  """Abstract audio of one 10 s segment, `[batch, samples]`."""
  config = base.get_config("encoder")
  samples = int(round(config.data.segment_seconds * config.data.sample_rate))
  return jax.ShapeDtypeStruct((batch, samples), jnp.float32)


def encoder_module(name):
  """The published-width encoder `name` (crnn | hppnet)."""
  return transcriber.build_encoder(base.get_config(f"encoder,encoder={name}"))


def decoder_module(size, conditioning="prefix", max_len=FLOPS_TOKENS):
  """A decoder of a configs/base.py DECODER_SIZES size over hiermt's vocabulary."""
  layers, heads, dim, _ = base.DECODER_SIZES[size]
  return decoder_lib.Decoder(vocabulary.VOCAB_SIZE, layers, heads, dim, max_len=max_len, conditioning=conditioning)


def params_report() -> dict:
  """Parameter counts and forward FLOPs per 10 s segment, as a JSON-ready dict."""
  key = jax.random.key(0)
  audio = segment_audio()
  report = {"encoder": {}, "decoder": {c: {} for c in base.CONDITIONINGS},
            "flops": {"encoder": {}, "decoder": {}}, "encoder_features": {}}
  for name in base.ENCODERS:
    encoder = encoder_module(name)
    variables = jax.eval_shape(lambda k, a, e=encoder: e.init(k, a, train=False), key, audio)
    report["encoder"][name] = decoder_lib.count_params(variables["params"], exclude=())
    apply = lambda v, a, e=encoder: e.apply(v, a, train=False)["features"]  # noqa: E731
    forward, features = jax.make_jaxpr(apply, return_shape=True)(variables, audio)  # features [1, frames, d_enc]
    report["encoder_features"][name] = {"frames": features.shape[1], "dim": features.shape[2]}
    report["flops"]["encoder"][name] = flops.matmul_flops(forward)
    report["flops"]["decoder"][name] = {}
    tokens = jax.ShapeDtypeStruct((1, FLOPS_TOKENS), jnp.int32)
    for size in base.DECODER_SIZES:
      decoder = decoder_module(size)
      variables = jax.eval_shape(decoder.init, key, tokens, features)
      forward = jax.make_jaxpr(decoder.apply)(variables, tokens, features)
      report["flops"]["decoder"][name][size] = flops.matmul_flops(forward)
      report["decoder"]["prefix"][size] = decoder_lib.count_params(variables["params"])

  for size in base.DECODER_SIZES:
    variables = jax.eval_shape(decoder_module(size, "cross").init, key, jax.ShapeDtypeStruct((1, 4), jnp.int32),
                               jax.ShapeDtypeStruct((1, 4, 1536), jnp.float32))
    report["decoder"]["cross"][size] = decoder_lib.count_params(variables["params"])

  report["assumptions"] = {
      "vocab_size": vocabulary.VOCAB_SIZE,
      "encoder_width": 1.0,
      "decoder_params": "audio projection (audio_proj) excluded",
      "flops": "forward, batch 1, one 10 s segment; 2 x multiply-adds of matmuls and convolutions "
               "(loops unrolled by trip count; element-wise ops and FFTs excluded)",
      "decoder_flops": f"prefix conditioning, prefix = the encoder's frames (no pooling), {FLOPS_TOKENS} tokens",
  }
  return report
