"""Stage models: a roll-based encoder, optionally followed by the note-token decoder.

`build_model(config)` is the one place that turns the config into a module. Every
stage gets a `Transcriber`, so parameters always sit under `params/encoder/...`
(and `params/decoder/...` for the language-model stages): the encoder stage's
subtree initialises the LM stages' encoder unchanged, and freezing is by prefix.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hiermt import notes
from hiermt import vocabulary
from hiermt.data import rolls
from hiermt.models import crnn
from hiermt.models import decoder as decoder_lib
from hiermt.models import hppnet

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Transcriber(nn.Module):
  """Encoder (CRNN or HPPNet) -> frame features -> decoder.

  Attributes:
    encoder: maps audio `[batch, samples]` to a dict of rolls and `features`.
    decoder: the note-token decoder; None for the encoder stage.
    freeze_encoder: run the encoder in inference mode (running BatchNorm
      statistics, no dropout) and stop gradients at its features.
  """
  encoder: nn.Module
  decoder: decoder_lib.Decoder | None = None
  freeze_encoder: bool = False

  def __call__(self, audio, tokens=None, *, train: bool):
    """Teacher-forced forward pass.

    Args:
      audio: `[batch, samples]` 16 kHz audio.
      tokens: int `[batch, length]` token sequences; LM stages only.
      train: training mode for the encoder (BatchNorm statistics, dropout).

    Returns:
      Encoder stage: the encoder's dict (`frame`, `onset`, `offset`, `velocity`
      `[batch, frames, 88]`, `features`). LM stages: float32 logits
      `[batch, length, vocab]`, row t predicting token t + 1.
    """
    if self.decoder is None:
      if tokens is not None:
        raise ValueError("this is an encoder-stage model (no decoder); call it with audio only")
      return self.encoder(audio, train=train)
    if tokens is None:
      raise ValueError("language-model stages need tokens: model.apply(variables, audio, tokens, train=...)")
    return self.decoder(tokens, self.encode(audio, train=train))

  def decode_features(self, features, tokens, *, train: bool = False):
    """Teacher-forced logits `[batch, length, vocab]` from `encode` features `[batch, frames, d_enc]`
    computed earlier (a frozen encoder's `train.feature_pool`); the decoder has no train mode."""
    del train
    return self.decoder(tokens, features)

  def encode(self, audio, *, train: bool = False):
    """Frame features `[batch, frames, d_enc]` of audio `[batch, samples]` (gradient-free when frozen)."""
    features = self.encoder(audio, train=train and not self.freeze_encoder)["features"]
    return jax.lax.stop_gradient(features) if self.freeze_encoder else features

  def decode(self, tokens, features=None):
    """One KV-cached decoding call (see `decoder.Decoder`); pass `mutable=["cache"]`.

    Args:
      tokens: int `[batch, n]`, the next n tokens.
      features: `encode(...)` output on the first (prefill) call, None later.

    Returns:
      float32 logits `[batch, n, vocab]`.
    """
    if self.decoder is None:
      raise ValueError("the encoder stage has no decoder to decode with")
    return self.decoder(tokens, features, decode=True)

  @nn.nowrap
  def init_cache(self, features) -> dict:
    """Zero `cache` collection for `decode`, given features (or their shape) `[batch, frames, d_enc]`."""
    if self.decoder is None:
      raise ValueError("the encoder stage has no decoder cache")
    return {"decoder": self.decoder.init_cache(features)}


def build_encoder(config) -> nn.Module:
  """The roll-based encoder named by `config.encoder.name`, in the config's compute dtype."""
  dtype = compute_dtype(config)
  name = config.encoder.name
  if name == "crnn":
    return crnn.CRNN(width=config.encoder.width, dropout=config.encoder.dropout, dtype=dtype)
  if name == "hppnet":
    return hppnet.HPPNet(width=config.encoder.width, dtype=dtype)
  raise ValueError(f"unknown config.encoder.name {name!r}; valid: crnn, hppnet")


def build_decoder(config) -> decoder_lib.Decoder:
  """The note-token decoder of `config.decoder` (sizes, conditioning, pooling, time-token
  initialisation) and `config.train`."""
  d = config.decoder
  if config.data.max_tokens <= 0:
    raise ValueError(f"config.data.max_tokens must be positive for stage {config.stage!r}")
  frames_per_second = type(build_encoder(config)).FRAMES_PER_SECOND / d.prefix_pool
  time_tokens = (vocabulary.TIME_OFFSET, vocabulary.NUM_TIMES, frames_per_second / notes.STEPS_PER_SECOND)
  note_reader = d.get("note_reader", 0)
  if note_reader and config.encoder.name != "hppnet":
    raise ValueError(f"config.decoder.note_reader reads the encoder's rolls key by key, which only HPPNet's "
                     f"features are (4 rolls x 88 keys); set it to 0 for encoder {config.encoder.name!r}")
  onset_prior = bool(d.get("onset_prior", False))
  if onset_prior and not note_reader:
    raise ValueError("config.decoder.onset_prior is a prior of the note reader: set config.decoder.note_reader > 0 "
                     "(HPPNet) or onset_prior to False")
  # What follows a pitch token: the next onset in onset_pitch, the note's end in offset and flatten
  # (a velocity in velocity). Each prior is read where it describes that token.
  onset_prior = onset_prior and config.stage == "onset_pitch"
  end_prior = bool(note_reader) and config.stage in ("offset", "flatten")
  # .get: options absent from the config.json of stages trained before they existed.
  return decoder_lib.Decoder(
      vocab_size=vocabulary.VOCAB_SIZE, num_layers=d.num_layers, num_heads=d.num_heads, dim=d.dim,
      max_len=config.data.max_tokens, conditioning=d.conditioning, prefix_pool=d.prefix_pool,
      dtype=compute_dtype(config), remat=config.train.remat, time_tokens=time_tokens,
      time_init=d.get("time_init", False), rope_time=float(d.get("rope_time", 0.0)),
      rope_fraction=d.get("rope_fraction", 1.0), note_reader=note_reader,
      key_tokens=(vocabulary.PITCH_OFFSET + rolls.MIN_PITCH, hppnet.NUM_PITCHES),
      velocity_tokens=(vocabulary.VELOCITY_OFFSET, vocabulary.NUM_VELOCITIES), sustain_token=vocabulary.NOTE_SUSTAIN,
      end_prior=end_prior, onset_prior=onset_prior, eos_token=vocabulary.EOS)


def compute_dtype(config) -> Any:
  """`config.train.dtype` as a jnp dtype; parameters always stay float32."""
  if config.train.dtype not in DTYPES:
    raise ValueError(f"unknown config.train.dtype {config.train.dtype!r}; valid: {', '.join(DTYPES)}")
  return DTYPES[config.train.dtype]


def build_model(config) -> Transcriber:
  """The model for `config.stage`: the encoder alone for `encoder`, encoder + decoder otherwise."""
  encoder = build_encoder(config)
  if config.stage == "encoder":
    return Transcriber(encoder)
  return Transcriber(encoder, build_decoder(config), freeze_encoder=config.freeze_encoder)


def example_inputs(config) -> tuple:
  """Zero inputs of one example of `config` for `Transcriber.init`: (audio `[1, samples]`,) for the
  encoder stage, (audio, tokens `[1, max_tokens]`) for the others."""
  samples = int(round(config.data.segment_seconds * config.data.sample_rate))
  audio = jnp.zeros((1, samples), jnp.float32)
  if config.stage == "encoder":
    return (audio,)
  return audio, jnp.zeros((1, config.data.max_tokens), jnp.int32)
