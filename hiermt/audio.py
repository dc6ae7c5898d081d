"""Audio loading and the two spectral front ends, as jittable JAX functions.

The data loader ships raw 16 kHz waveforms; the encoders turn them into
features inside the jitted step with fixed filters built once with librosa:

* `log_mel`: Kong et al.'s CRNN input. Hann STFT (n_fft 2048, hop 160, centred
  with reflect padding), power spectrogram, librosa's default (Slaney-style)
  mel filters with 229 bins over 30-8000 Hz, then `10 * log10(max(S, 1e-10))`
  with no top_db. 100 frames per second.
* `cqt`: HPPNet's input. Constant-Q magnitude, 352 bins at 48 per octave from
  27.5 * 2**(-1/24) Hz, hop 320 (50 frames per second), centred with reflect
  padding, librosa's CQT scaling (L1-normalised wavelets times sqrt(length)).
  HPPNet passes the magnitude through torchaudio's `AmplitudeToDB` with its
  default power scale, i.e. `10 * log10(max(|C|, 1e-10))` floored at 80 dB
  below the maximum; we do the same, except that the maximum is taken per
  example rather than over the batch, so features do not depend on which
  segments share a batch (or a device).
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import soundfile

SAMPLE_RATE = 16000

# Log-mel (Kong et al. 2021).
MEL_N_FFT = 2048
MEL_HOP = 160
MEL_BINS = 229
MEL_FMIN = 30.0
MEL_FMAX = 8000.0
MEL_AMIN = 1e-10

# Constant-Q (Wei et al. 2022, HPPNet).
CQT_HOP = 320
CQT_BINS = 352
CQT_BINS_PER_OCTAVE = 48
CQT_FMIN = 27.5 * 2.0 ** (-1 / 24)  # a quarter tone below A0, so A0 is a bin centre
CQT_AMIN = 1e-10
CQT_TOP_DB = 80.0


class AudioError(ValueError):
  """An audio file could not be read or decoded."""


def load_audio(path, sample_rate=SAMPLE_RATE):
  """Reads an audio file as mono float32 at `sample_rate`.

  Args:
    path: a WAV, FLAC, OGG or MP3 file (anything libsndfile decodes).
    sample_rate: target rate in Hz; other rates are resampled with soxr.

  Returns:
    [samples] float32 in [-1, 1], the mean of the file's channels.

  Raises:
    AudioError: the file is missing, truncated or not a supported format.
  """
  path = os.fspath(path)
  try:
    audio, file_rate = soundfile.read(path, dtype="float32", always_2d=True)  # [samples, channels]
  except (soundfile.LibsndfileError, RuntimeError, OSError) as e:
    raise AudioError(
        f"cannot decode audio file {path!r} ({e}); check that it exists and is a complete "
        "WAV/FLAC/OGG/MP3 file, or convert it, e.g. `ffmpeg -i IN -ar 16000 -ac 1 OUT.wav`") from e
  if audio.shape[0] == 0:
    raise AudioError(f"audio file {path!r} contains no samples; pass a non-empty recording")
  audio = audio.mean(axis=1)  # [samples]
  if file_rate != sample_rate:
    audio = librosa.resample(audio, orig_sr=file_rate, target_sr=sample_rate, res_type="soxr_hq")
  return np.clip(audio, -1.0, 1.0).astype(np.float32)


def pad_or_crop(audio, num_samples):
  """Zero-pads or crops the last axis of `audio` to exactly `num_samples`."""
  audio = np.asarray(audio)
  length = audio.shape[-1]
  if length >= num_samples:
    return audio[..., :num_samples]
  widths = [(0, 0)] * (audio.ndim - 1) + [(0, num_samples - length)]
  return np.pad(audio, widths)


def num_frames(num_samples, hop):
  """Frames a centred front end with this hop gives for `num_samples` samples."""
  return num_samples // hop + 1


def _as_float(audio):
  """[batch, samples] float32; int16 PCM is scaled to [-1, 1)."""
  audio = jnp.asarray(audio)
  if audio.ndim != 2:
    raise ValueError(f"audio must be [batch, samples], got shape {audio.shape}; add a batch axis with audio[None]")
  if jnp.issubdtype(audio.dtype, jnp.integer):
    return audio.astype(jnp.float32) / 32768.0
  return audio.astype(jnp.float32)


def _frame(x, length, hop, count):
  """Overlapping frames [batch, count, length] of x [batch, samples], frame t at t * hop.

  Built from strided slices of `gcd(length, hop)`-sample blocks rather than a
  gather, so no [count, length] index array ends up in the compiled program.
  """
  block = math.gcd(length, hop)
  needed = (count - 1) * hop + length  # <= samples
  blocks = x[:, :needed].reshape(x.shape[0], needed // block, block)  # [batch, blocks, block]
  step = hop // block
  parts = [blocks[:, j:j + (count - 1) * step + 1:step] for j in range(length // block)]  # each [batch, count, block]
  return jnp.stack(parts, axis=2).reshape(x.shape[0], count, length)


@functools.cache
def _mel_constants():
  """Hann window [n_fft] and mel filters [n_fft // 2 + 1, mel_bins], float32."""
  window = librosa.filters.get_window("hann", MEL_N_FFT, fftbins=True).astype(np.float32)
  mel = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=MEL_N_FFT, n_mels=MEL_BINS, fmin=MEL_FMIN, fmax=MEL_FMAX)
  return window, np.ascontiguousarray(mel.T, dtype=np.float32)


def log_mel(audio):
  """Kong et al.'s log-mel spectrogram.

  Args:
    audio: [batch, samples] float in [-1, 1] (or int16 PCM) at 16 kHz.

  Returns:
    [batch, samples // 160 + 1, 229] float32 in dB (1001 frames for 10 s).
  """
  x = _as_float(audio)  # [batch, samples]
  window, mel = _mel_constants()
  count = num_frames(x.shape[1], MEL_HOP)
  half = MEL_N_FFT // 2
  x = jnp.pad(x, ((0, 0), (half, half)), mode="reflect")  # [batch, samples + n_fft]
  frames = _frame(x, MEL_N_FFT, MEL_HOP, count)  # [batch, frames, n_fft]
  spec = jnp.fft.rfft(frames * window, axis=-1)  # [batch, frames, n_fft // 2 + 1]
  power = jnp.square(spec.real) + jnp.square(spec.imag)
  mel_power = jnp.matmul(power, mel, precision=jax.lax.Precision.HIGHEST)  # [batch, frames, mel_bins]
  return 10.0 * jnp.log10(jnp.maximum(mel_power, MEL_AMIN))


@functools.cache
def _cqt_constants():
  """Constant-Q kernels grouped by octave, as block convolutions.

  A kernel of length `m * hop` applied every `hop` samples is a stride-1
  convolution over the signal cut into `hop`-sample blocks, with `hop` input
  channels and `m` taps; grouping bins by octave keeps each group's window
  (and so its cost) close to its own longest filter instead of the lowest
  note's 2.6 s.

  Returns:
    (groups, max_blocks): groups is a tuple of (blocks, kernel) with kernel
    [blocks, hop, 2 * bins] float32 (real parts, then imaginary parts), from
    the lowest bins up; max_blocks is the widest group's `blocks`.
  """
  freqs = librosa.cqt_frequencies(n_bins=CQT_BINS, fmin=CQT_FMIN, bins_per_octave=CQT_BINS_PER_OCTAVE)
  wavelets, lengths = librosa.filters.wavelet(freqs=freqs, sr=SAMPLE_RATE, window="hann", pad_fft=False, norm=1)
  # librosa.cqt(scale=True) responds like L1-normalised wavelets times sqrt(length).
  wavelets = wavelets * np.sqrt(lengths)[:, None]  # [bins, max_length], each filter centred
  centre = wavelets.shape[1] // 2
  groups = []
  # Octaves counted from the top, as librosa does, so the lowest group may be partial.
  edges = list(range(CQT_BINS, 0, -CQT_BINS_PER_OCTAVE)) + [0]
  for hi, lo in zip(edges[:-1], edges[1:], strict=True):
    half_blocks = int(np.ceil(np.ceil(lengths[lo] / 2 + 1) / CQT_HOP))
    blocks = 2 * half_blocks
    window = np.zeros((hi - lo, blocks * CQT_HOP), np.complex128)  # [bins, blocks * hop]
    start = centre - half_blocks * CQT_HOP
    lo_src, hi_src = max(start, 0), min(start + blocks * CQT_HOP, wavelets.shape[1])
    window[:, lo_src - start:hi_src - start] = wavelets[lo:hi, lo_src:hi_src]
    kernel = np.concatenate([window.real, window.imag], axis=0)  # [2 * bins, blocks * hop]
    kernel = kernel.reshape(2 * (hi - lo), blocks, CQT_HOP).transpose(1, 2, 0)  # [blocks, hop, 2 * bins]
    groups.append((blocks, np.ascontiguousarray(kernel, dtype=np.float32)))
  groups.reverse()
  return tuple(groups), max(b for b, _ in groups)


def cqt(audio):
  """HPPNet's constant-Q spectrogram in dB.

  Args:
    audio: [batch, samples] float in [-1, 1] (or int16 PCM) at 16 kHz.

  Returns:
    [batch, samples // 320 + 1, 352] float32 (501 frames for 10 s): the
    magnitude as `10 * log10(max(|C|, 1e-10))`, floored at 80 dB below each
    example's maximum.
  """
  x = _as_float(audio)  # [batch, samples]
  groups, max_blocks = _cqt_constants()
  batch, samples = x.shape
  frames = num_frames(samples, CQT_HOP)
  # Frame t is centred on sample t * hop; the widest group reaches max_blocks / 2 blocks each way.
  left = max_blocks // 2 * CQT_HOP
  total_blocks = frames - 1 + max_blocks
  x = jnp.pad(x, ((0, 0), (left, total_blocks * CQT_HOP - samples - left)), mode="reflect")
  x = x.reshape(batch, total_blocks, CQT_HOP)  # [batch, blocks, hop]
  magnitudes = []
  for blocks, kernel in groups:
    first = (max_blocks - blocks) // 2
    response = jax.lax.conv_general_dilated(
        x[:, first:first + frames - 1 + blocks], kernel, window_strides=(1,), padding="VALID",
        dimension_numbers=("NWC", "WIO", "NWC"), precision=jax.lax.Precision.HIGHEST)  # [batch, frames, 2 * bins]
    real, imag = jnp.split(response, 2, axis=-1)
    magnitudes.append(jnp.sqrt(jnp.square(real) + jnp.square(imag)))
  magnitude = jnp.concatenate(magnitudes, axis=-1)  # [batch, frames, 352]
  db = 10.0 * jnp.log10(jnp.maximum(magnitude, CQT_AMIN))
  return jnp.maximum(db, db.max(axis=(1, 2), keepdims=True) - CQT_TOP_DB)
