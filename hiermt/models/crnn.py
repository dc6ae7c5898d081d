"""Kong et al. (2021) high-resolution CRNN note model as a roll-based encoder.

The model follows `Regress_onset_offset_frame_velocity_CRNN` from
bytedance/piano_transcription: log-mel input, BatchNorm over mel bins, four
acoustic models (frame, onset, offset, velocity), a biGRU that conditions
onsets on velocities and a biGRU that conditions frames on onsets and offsets.
The pedal model is not included.

Each of Kong's acoustic models (`AcousticModelCRnn8Dropout`) is split here:
its conv stack and fc5 are the `{head}_model` module, its 2-layer biGRU is
row `head` of the grouped `acoustic_gru_{0,1}` layers (all four heads run in
one scan per layer), and its output layer is `{head}_fc`.

As encoder features for the language model we return what the official LM code
uses: the onset-conditioning biGRU output, the offset acoustic model's biGRU
output and the frame-conditioning biGRU output, concatenated (3 x 512 = 1536
at width 1.0), each taken after its dropout as in that code.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hiermt import audio
from hiermt.models import layers

NUM_PITCHES = 88
HEADS = ("frame", "onset", "offset", "velocity")  # the four acoustic models, in group order
# Kong's code builds bn0 and the conv blocks' norms as `BatchNorm2d(channels, momentum)`,
# whose second positional argument is eps: they run with eps 0.01 and PyTorch's default
# momentum 0.1 (running-average decay 0.9). Only fc5's `BatchNorm1d(768, momentum=momentum)`
# gets momentum 0.01 (decay 0.99) with the default eps 1e-5. Imported weights need exactly these.
_CONV_BN = dict(momentum=0.9, epsilon=0.01)
_FC_BN = dict(momentum=0.99, epsilon=1e-5)


def _batch_norm(train, kind, name=None):
  # Normalisation stays float32 under a bfloat16 compute dtype; the next layer casts its input.
  return nn.BatchNorm(use_running_average=not train, dtype=jnp.float32, name=name, **kind)


class _ConvBlock(nn.Module):
  """Two 3x3 conv + BatchNorm + ReLU, then average pooling by 2 in frequency."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    # x: [batch, time, freq, channels]
    for _ in range(2):
      x = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype)(x)
      x = nn.relu(_batch_norm(train, _CONV_BN)(x))
    return nn.avg_pool(x, (1, 2), strides=(1, 2))  # [batch, time, freq // 2, features]


class _AcousticFront(nn.Module):
  """The convolutional part of one acoustic model: conv stack, fc5, BatchNorm.

  [batch, time, mel, 1] -> [batch, time, 768 * width].
  """
  width: float
  dropout: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    deterministic = not (train and self.dropout)
    for channels in (48, 64, 96, 128):
      x = _ConvBlock(layers.scaled(channels, self.width), dtype=self.dtype)(x, train)
      x = nn.Dropout(0.2, deterministic=deterministic)(x)
    batch, time = x.shape[:2]
    # Channel-major flattening, as PyTorch's x.transpose(1, 2).flatten(2), so
    # fc5 weights correspond one to one with Kong's.
    x = jnp.swapaxes(x, 2, 3).reshape(batch, time, -1)  # [batch, time, channels * 14]
    x = nn.Dense(layers.scaled(768, self.width), use_bias=False, dtype=self.dtype, name="fc5")(x)
    x = nn.relu(_batch_norm(train, _FC_BN)(x))
    return nn.Dropout(0.5, deterministic=deterministic)(x)


class CRNN(nn.Module):
  """Kong et al.'s CRNN note model, returning rolls and encoder features.

  Attributes:
    width: multiplies conv channels, the 768-unit fc and the 256-unit GRUs;
      1.0 is the published model, small widths are for CPU tests.
    dropout: whether dropout is active when `train=True`.
    dtype: compute dtype (parameters stay float32).
  """
  width: float = 1.0
  dropout: bool = True
  dtype: Any = jnp.float32

  FRAMES_PER_SECOND = 100

  @property
  def feature_dim(self):
    """Width of `features`: three biGRU outputs of 2 x 256 x width each."""
    return 3 * 2 * layers.scaled(256, self.width)

  @nn.compact
  def __call__(self, audio_batch, *, train):
    """Runs the note model.

    Args:
      audio_batch: [batch, samples] 16 kHz audio, float in [-1, 1] or int16.
      train: batch statistics and dropout (pass `mutable=["batch_stats"]`
        and a `dropout` rng); otherwise running averages, no dropout.

    Returns:
      dict of float32 arrays: `frame`, `onset`, `offset`, `velocity`
      [batch, frames, 88] sigmoid outputs, `logits` (a dict of the four
      pre-sigmoid outputs, for numerically stable losses) and `features`
      [batch, frames, feature_dim], with frames = samples // 160 + 1.
    """
    dropout = nn.Dropout(0.5, deterministic=not (train and self.dropout))
    gru = layers.scaled(256, self.width)
    x = audio.log_mel(audio_batch)  # [batch, frames, 229]
    # BatchNorm over mel bins (Kong's bn0), before any compute-dtype cast.
    x = _batch_norm(train, _CONV_BN, name="mel_norm")(x)
    x = x.astype(self.dtype)[..., None]  # [batch, frames, 229, 1]

    # Four acoustic models; their biGRUs run as one grouped scan per layer.
    h = jnp.stack([
        _AcousticFront(self.width, self.dropout, dtype=self.dtype, name=f"{head}_model")(x, train)
        for head in HEADS])  # [4, batch, frames, 768 * width]
    for layer in range(2):
      h = layers.BiGRU(gru, groups=len(HEADS), dtype=self.dtype, name=f"acoustic_gru_{layer}")(h)
    h = dropout(h)  # [4, batch, frames, 2 * gru]
    # Output layers run in float32, so logits and probabilities keep their precision under bfloat16.
    head = lambda name, x: nn.Dense(NUM_PITCHES, dtype=jnp.float32, name=name)(x)  # noqa: E731
    logits = {name: head(f"{name}_fc", h[i]) for i, name in enumerate(HEADS)}  # each [batch, frames, 88]
    frame, onset, offset, velocity = (nn.sigmoid(logits[name]) for name in HEADS)
    offset_hidden = h[HEADS.index("offset")]

    # Onsets conditioned on velocities: [onset, sqrt(onset) * velocity].
    x = jnp.concatenate([onset, jnp.sqrt(onset) * jax.lax.stop_gradient(velocity)], axis=-1)
    onset_hidden = dropout(layers.BiGRU(gru, dtype=self.dtype, name="onset_gru")(x))  # [batch, frames, 2 * gru]
    logits["onset"] = head("onset_gru_fc", onset_hidden)
    onset = nn.sigmoid(logits["onset"])

    # Frames conditioned on (refined) onsets and offsets.
    x = jnp.concatenate([frame, jax.lax.stop_gradient(onset), jax.lax.stop_gradient(offset)], axis=-1)
    frame_hidden = dropout(layers.BiGRU(gru, dtype=self.dtype, name="frame_gru")(x))  # [batch, frames, 2 * gru]
    logits["frame"] = head("frame_gru_fc", frame_hidden)
    frame = nn.sigmoid(logits["frame"])

    features = jnp.concatenate([onset_hidden, offset_hidden, frame_hidden], axis=-1).astype(jnp.float32)
    return {"frame": frame, "onset": onset, "offset": offset, "velocity": velocity, "features": features,
            "logits": logits}
