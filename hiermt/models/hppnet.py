"""HPPNet-sp (Wei et al. 2022) as a roll-based encoder.

Follows the official WX-Wei/HPPNet default configuration: a CQT front end and
two sub-networks with the same CNN trunk (harmonic dilated convolutions), an
onset sub-network with the onset head and a frame sub-network with the frame,
offset and velocity heads that runs at half the frame rate (max-pooled input,
outputs linearly interpolated back). Each head is a biLSTM along time shared
by all 88 pitches, then a linear map to one value and a sigmoid; a subnet's
heads run as one grouped scan.

As encoder features we return what the official LM code feeds its decoder:
the four roll outputs, interleaved per pitch as (onset, frame, offset,
velocity), i.e. 352 values per frame at 50 frames per second.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hiermt import audio
from hiermt.models import layers

NUM_PITCHES = 88
# Frequency dilations of the harmonic convolution: round(48 * log2(h)) bins for
# harmonics h = 2..9, at 48 CQT bins per octave.
HARMONIC_DILATIONS = tuple(int(round(audio.CQT_BINS_PER_OCTAVE * np.log2(h))) for h in range(2, 10))
ONSET_HEADS = ("onset",)
FRAME_HEADS = ("frame", "offset", "velocity")
ROLLS = ("onset", "frame", "offset", "velocity")  # order of the interleaved features


class _ConvWeights(nn.Module):
  """The kernel [kh, kw, in, out] and bias [out] of an `nn.Conv`, same names and initialisers, unapplied."""
  features: int
  kernel_size: tuple[int, int]
  in_features: int

  @nn.compact
  def __call__(self):
    kernel = self.param("kernel", nn.linear.default_kernel_init, (*self.kernel_size, self.in_features, self.features))
    return kernel, self.param("bias", nn.initializers.zeros_init(), (self.features,))


def _harmonic_convs(x, kernels):
  """Sum over harmonics k of x convolved along bins with kernels[k] at dilation HARMONIC_DILATIONS[k].

  x [batch, time, bins, in], kernels [harmonics, 3, in, out] -> [batch, time, bins, out] ("same"
  zero padding as `nn.Conv`, no bias).
  """
  return sum(jax.lax.conv_general_dilated(x, kernel[None], (1, 1), "SAME", rhs_dilation=(1, d),
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
             for kernel, d in zip(kernels, HARMONIC_DILATIONS))


@jax.checkpoint  # the backward pass keeps x, not the 17 shifted copies
def _harmonic_matmul(x, kernels):
  """`_harmonic_convs` as one matmul over shifted copies of x stacked on the channel axis.

  Conv k's taps read bins f - d_k, f and f + d_k, so every centre tap reads f
  and the sum reads 17 offsets: [.., bins, 17 in] @ [17 in, out].
  """
  offsets = (0,) + tuple(o for d in HARMONIC_DILATIONS for o in (-d, d))
  taps = [kernels[:, 1].sum(0)] + [kernels[k, j] for k in range(len(kernels)) for j in (0, 2)]  # 17 x [in, out]
  pad, bins = max(HARMONIC_DILATIONS), x.shape[2]
  padded = jnp.pad(x, ((0, 0), (0, 0), (pad, pad), (0, 0)))  # [batch, time, bins + 2 pad, in]
  stacked = jnp.concatenate([padded[:, :, pad + o:pad + o + bins] for o in offsets], axis=-1)  # [.., bins, 17 in]
  return stacked @ jnp.concatenate(taps, axis=0)


class _Trunk(nn.Module):
  """CNN trunk: [batch, time, 352, 1] dB CQT -> [batch, time, 88, features].

  Parameters are named `Conv_0` .. `Conv_15` in the order of HPPNet's layers
  (docs/design.md maps them to the official tensors).
  """
  channels: int
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    names = (f"Conv_{i}" for i in range(16))

    def conv(x, features, kernel, dilation=(1, 1)):
      return nn.Conv(features, kernel, padding="SAME", kernel_dilation=dilation, dtype=self.dtype,
                     name=next(names))(x)

    def norm(x):
      # Normalisation in float32 under a bfloat16 compute dtype; the next conv casts its input.
      return nn.InstanceNorm(use_scale=False, use_bias=False, epsilon=1e-5, dtype=jnp.float32)(x)

    for _ in range(3):
      x = norm(nn.relu(conv(x, self.channels, (7, 7))))  # [batch, time, 352, channels]
    # Harmonic dilated convolution: one [1 x 3] conv per harmonic, summed. Two equal forms, as
    # measured fastest on XLA:CPU: training (4 x 4 s, width 1/4) steps 20 % faster with the
    # matmul, whose gradients avoid a transposed copy of x per conv; inference at width 1 runs
    # the convolutions 25 % faster (the matmul's stacked input is 17 times x).
    harmonics = [_ConvWeights(self.features, (1, 3), x.shape[-1], name=next(names))() for _ in HARMONIC_DILATIONS]
    kernels = jnp.stack([kernel[0] for kernel, _ in harmonics]).astype(self.dtype)  # [8, 3, channels, features]
    x = (_harmonic_matmul if train else _harmonic_convs)(x.astype(self.dtype), kernels)
    x = x + sum(b for _, b in harmonics).astype(self.dtype)
    x = nn.relu(x)  # [batch, time, 352, features]
    x = nn.relu(conv(x, self.features, (1, 3), (1, audio.CQT_BINS_PER_OCTAVE)))
    if self.dtype != jnp.float32:
      # Under jit, XLA:CPU fuses the bfloat16 convolutions above into the pooling's fusion and
      # the fused program returns -inf (the same forward run eagerly is finite). The barrier
      # keeps them apart; float32 skips it (7 % slower on CPU, and unaffected).
      x = jax.lax.optimization_barrier(x)
    # Max over each pitch's 4 bins ([1 x 4] pool, stride 4). In training as a reduction over a
    # reshaped axis, whose gradient is a mask: XLA:CPU lowers the pool's gradient to an argmax
    # over index arrays. Inference keeps the pool (4 % faster at full width). Same values.
    if train:
      batch, time, bins, features = x.shape
      x = x.reshape(batch, time, NUM_PITCHES, bins // NUM_PITCHES, features).max(axis=3)
    else:
      x = nn.max_pool(x, (1, 4), strides=(1, 4))
    x = norm(x)  # [batch, time, 88, features]: one bin per pitch
    x = norm(nn.relu(conv(x, self.features, (1, 3), (1, 12))))
    for _ in range(3):
      x = norm(nn.relu(conv(x, self.features, (5, 1))))
    return x


class _PitchHeads(nn.Module):
  """HPPNet's FreqGroupLSTM heads on one shared input.

  Per head: a biLSTM along time whose weights are shared by all 88 pitches,
  then Linear(1) (in float32) giving the logit of the head's sigmoid. The
  heads' LSTMs run as one grouped scan.
  [batch, time, 88, in] -> {head: float32 logits [batch, time, 88]}.
  """
  features: int
  heads: tuple[str, ...]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, time, pitches, channels = x.shape
    x = jnp.transpose(x, (0, 2, 1, 3)).reshape(batch * pitches, time, channels)  # [batch * 88, time, in]
    x = jnp.broadcast_to(x, (len(self.heads), *x.shape))  # [heads, batch * 88, time, in]
    h = layers.BiLSTM(max(1, self.features // 2), groups=len(self.heads), dtype=self.dtype, name="lstm")(x)
    logits = {}
    for i, head in enumerate(self.heads):
      flat = nn.Dense(1, dtype=jnp.float32, name=f"{head}_fc")(h[i])[..., 0]  # [batch * 88, time]
      logits[head] = flat.reshape(batch, pitches, time).transpose(0, 2, 1)  # [batch, time, 88]
    return logits


class _SubNet(nn.Module):
  """Trunk plus named heads (logits); `time_pool` halves the frame rate inside."""
  channels: int
  features: int
  heads: tuple[str, ...]
  time_pool: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train):
    # x: [batch, time, 352, 1]
    batch, time = x.shape[:2]
    if self.time_pool:
      x = nn.max_pool(x, (2, 1), strides=(2, 1))  # [batch, time // 2, 352, 1]
    y = _Trunk(self.channels, self.features, dtype=self.dtype, name="trunk")(x, train)
    logits = _PitchHeads(self.features, self.heads, dtype=self.dtype, name="heads")(y)  # each [batch, time', 88]
    if self.time_pool:
      # Linear interpolation with half-pixel centres, as PyTorch's bilinear
      # (align_corners=False) over an unchanged pitch axis. The official code
      # interpolates the probabilities; interpolating the logits keeps every
      # output a sigmoid of a logit, so losses can be computed stably from logits.
      logits = {k: jax.image.resize(v, (batch, time, NUM_PITCHES), method="linear", antialias=False)
                for k, v in logits.items()}
    return logits


class HPPNet(nn.Module):
  """HPPNet-sp, returning rolls and encoder features.

  Attributes:
    width: multiplies the trunk's 16 channels and the 128-wide embedding and
      LSTM; 1.0 is the published model, small widths are for CPU tests.
    dtype: compute dtype (parameters stay float32).
  """
  width: float = 1.0
  dtype: Any = jnp.float32

  FRAMES_PER_SECOND = 50

  @property
  def feature_dim(self):
    """Width of `features`: four rolls of 88 pitches."""
    return len(ROLLS) * NUM_PITCHES

  @nn.compact
  def __call__(self, audio_batch, *, train):
    """Runs both sub-networks.

    Args:
      audio_batch: [batch, samples] 16 kHz audio, float in [-1, 1] or int16.
      train: training mode. HPPNet has neither dropout nor batch statistics,
        so it only picks the faster of two equal forms of the harmonic
        convolutions and the pitch pooling (`_Trunk`).

    Returns:
      dict of float32 arrays: `frame`, `onset`, `offset`, `velocity`
      [batch, frames, 88] sigmoid outputs, `logits` (a dict of the four
      pre-sigmoid outputs, for numerically stable losses) and `features`
      [batch, frames, 352], with frames = samples // 320 + 1.
    """
    x = audio.cqt(audio_batch).astype(self.dtype)[..., None]  # [batch, frames, 352, 1]
    channels, embedding = layers.scaled(16, self.width), layers.scaled(128, self.width)
    logits = _SubNet(channels, embedding, ONSET_HEADS, time_pool=False, dtype=self.dtype, name="onset_subnet")(x, train)
    logits |= _SubNet(channels, embedding, FRAME_HEADS, time_pool=True, dtype=self.dtype, name="frame_subnet")(x, train)
    rolls = {k: nn.sigmoid(v) for k, v in logits.items()}  # each float32 [batch, frames, 88]
    batch, frames = x.shape[:2]
    features = jnp.stack([rolls[k] for k in ROLLS], axis=-1).reshape(batch, frames, self.feature_dim)
    return rolls | {"features": features, "logits": logits}
