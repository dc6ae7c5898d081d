"""Waveform augmentation of training crops: recording level, colouring, room and noise.

Users transcribe their own recordings, made on pianos, in rooms and with microphones
that no rendering reproduces, so training crops are varied on the fly. Each effect is
applied with its own probability (`config.data.augment`), in the order a recording
chain applies them:

  1. EQ: a few random peaking and shelving bands (the piano, microphone and room colour);
  2. room: convolution with a synthetic impulse response (exponentially decaying noise
     with a random RT60, pre-delay and direct-to-reverberant ratio);
  3. noise: white or pink, at a random SNR relative to the crop;
  4. gain: the recording level (then scaled down to full scale if it would clip).

EQ and room are one linear filter, applied in a single FFT pass. The EQ is zero-phase
and the impulse response has its direct sound at lag 0, so no effect moves a note in
time and the labels of a crop stay exact. The reverberation of what was played before
the crop is heard in it: the caller passes `Augmenter.context` samples of audio
before the crop.
"""

import dataclasses
import functools

import numpy as np
import scipy.fft

# Energy falls 60 dB (amplitude 1000x) in one RT60.
_LN_1000 = float(np.log(1000.0))
# Zero padding (samples) that holds the zero-phase EQ's ringing off the ends of the crop.
_EQ_PAD = 4096
_EQ_KINDS = ("peak", "low_shelf", "high_shelf")
# Noise excerpts come from one fixed 65 s stretch of noise per colour (see _noise_bank),
# the same in every process and run.
_NOISE_BANK = 2**20
_NOISE_SEED = 0


def eq_db(freqs, bands):
  """The EQ curve in dB at `freqs` (Hz), the sum of its bands.

  Args:
    freqs: [bins] frequencies in Hz.
    bands: (kind, hz, gain_db, octaves) tuples. 'peak' is a bell centred on `hz`
      whose standard deviation is `octaves`; 'low_shelf' / 'high_shelf' change the
      level below / above `hz` by `gain_db`, with a transition about `octaves` wide.
  Returns:
    [bins] float32 gains in dB.
  """
  octave = np.log2(np.maximum(np.asarray(freqs, np.float32), np.float32(1.0)))  # [bins]
  total = np.zeros(len(octave), np.float32)  # [bins]
  for kind, hz, gain_db, octaves in bands:
    x = (octave - np.float32(np.log2(hz))) * np.float32(1.0 / octaves)  # [bins] distance in band widths
    if kind == "peak":
      total += np.float32(gain_db) * np.exp(np.float32(-0.5) * x * x)
    elif kind in ("low_shelf", "high_shelf"):  # logistic steps 1 / (1 + exp(-+4x)), written overflow-free
      sign = np.float32(-1.0 if kind == "low_shelf" else 1.0)
      total += np.float32(gain_db / 2.0) * (np.float32(1.0) + sign * np.tanh(np.float32(2.0) * x))
    else:
      raise ValueError(f"unknown EQ band kind {kind!r}; valid: {', '.join(_EQ_KINDS)}")
  return total


def impulse_response(rng, sample_rate, rt60, predelay, drr_db):
  """A synthetic room impulse response: direct sound, silence, then a decaying noise tail.

  Args:
    rng: numpy Generator for the tail's noise.
    sample_rate: Hz.
    rt60: seconds in which the tail's energy falls by 60 dB (it ends there).
    predelay: seconds from the direct sound to the start of the tail (at least one sample).
    drr_db: direct-to-reverberant energy ratio in dB.
  Returns:
    [taps] float32: 1 at lag 0 (the direct sound, so nothing is delayed), the tail from
    the pre-delay on.
  """
  start = max(1, int(round(predelay * sample_rate)))
  length = max(1, int(round(rt60 * sample_rate)))
  envelope = np.exp(-_LN_1000 * np.arange(length) / (rt60 * sample_rate))  # [length] amplitude
  tail = rng.standard_normal(length, dtype=np.float32) * envelope.astype(np.float32)  # [length]
  tail *= np.float32(np.sqrt(10.0 ** (-drr_db / 10.0) / np.dot(tail, tail)))
  ir = np.zeros(start + length, np.float32)  # [taps]
  ir[0] = 1.0
  ir[start:] = tail
  return ir


def filter_audio(audio, sample_rate, bands=(), ir=None):
  """`audio` through the EQ `bands` and the impulse response `ir`, in one FFT pass.

  Args:
    audio: [samples] float32.
    sample_rate: Hz.
    bands: EQ bands as in `eq_db` (none: flat).
    ir: [taps] impulse response with its direct sound at lag 0, or None.
  Returns:
    [samples] float32 aligned with `audio`: the linear (not circular) convolution, cut
    to the input's length.
  """
  taps = 1 if ir is None else len(ir)
  size = scipy.fft.next_fast_len(len(audio) + taps - 1 + (_EQ_PAD if bands else 0), real=True)
  spectrum = scipy.fft.rfft(audio, size)  # [size // 2 + 1] complex64
  if bands:
    freqs = np.arange(len(spectrum), dtype=np.float32) * np.float32(sample_rate / size)  # [bins] Hz
    spectrum *= np.exp(eq_db(freqs, bands) * np.float32(np.log(10.0) / 20.0))  # dB -> amplitude
  if ir is not None:
    spectrum *= scipy.fft.rfft(ir, size)
  return scipy.fft.irfft(spectrum, size)[:len(audio)]


@functools.cache
def _noise_bank(slope):
  """[_NOISE_BANK] float32 noise of unit power whose power spectrum falls as f**-slope.

  Made once per process from a fixed seed; crops take random excerpts of it, which is
  far cheaper than shaping fresh noise with an FFT for every crop.
  """
  rng = np.random.default_rng(_NOISE_SEED)
  spectrum = scipy.fft.rfft(rng.standard_normal(_NOISE_BANK, dtype=np.float32))  # [bins]
  spectrum[0] = 0.0  # no DC offset
  spectrum[1:] *= np.arange(1, len(spectrum), dtype=np.float32) ** np.float32(-slope / 2.0)
  noise = scipy.fft.irfft(spectrum, _NOISE_BANK)  # [_NOISE_BANK]
  return noise / np.float32(np.sqrt(np.mean(np.square(noise, dtype=np.float64))))


def add_noise(audio, rng, snr_db, slope):
  """`audio` plus stationary noise `snr_db` below its mean power.

  The noise is a random excerpt of a fixed stretch of noise of that colour, scaled
  so that the SNR over `audio` is exactly `snr_db`.

  Args:
    audio: [samples] float32.
    rng: numpy Generator that picks the noise excerpt.
    snr_db: signal-to-noise power ratio in dB over the whole of `audio`.
    slope: the noise power spectrum falls as f**-slope (0: white, 1: pink).
  Returns:
    [samples] float32; `audio` itself when it is silent (no signal to measure against).
  """
  power = float(np.dot(audio, audio)) / len(audio)
  if power == 0.0:
    return audio
  bank = _noise_bank(float(slope))
  if len(audio) > len(bank):
    bank = np.tile(bank, len(audio) // len(bank) + 1)
  start = int(rng.integers(len(bank) - len(audio) + 1))
  noise = bank[start:start + len(audio)]  # [samples]
  noise_power = float(np.dot(noise, noise)) / len(audio)
  return audio + noise * np.float32(np.sqrt(power / 10.0 ** (snr_db / 10.0) / noise_power))


@dataclasses.dataclass(frozen=True)
class Augmenter:
  """Augments training crops as `config.data.augment` says; picklable for Grain workers.

  Attributes:
    config: `config.data.augment` as a dict (see configs/base.py).
    sample_rate: Hz.
  """

  config: dict
  sample_rate: int

  @property
  def context(self):
    """Samples before a crop whose reverberation can reach into it: the longest impulse response."""
    c = self.config
    return max(1, int(round(c["predelay_s"][1] * self.sample_rate))) + int(round(c["rt60_s"][1] * self.sample_rate))

  def __call__(self, pcm, rng):
    """Augments one crop.

    Args:
      pcm: [context + samples] int16: `context` samples before the crop (zeros before
        the start of the piece), then the crop.
      rng: numpy Generator derived from (seed, example index), so the result is too.
    Returns:
      [samples] int16, the augmented crop; scaled down rather than clipped if louder
      than full scale.
    """
    c = self.config
    bands = ()
    if rng.random() < c["eq_prob"]:
      bands = tuple((_EQ_KINDS[int(rng.integers(len(_EQ_KINDS)))],
                     float(np.exp(rng.uniform(*np.log(c["eq_hz"])))),  # log-uniform centre
                     float(rng.uniform(-c["eq_db"], c["eq_db"])),
                     float(rng.uniform(*c["eq_octaves"])))
                    for _ in range(int(rng.integers(1, c["eq_bands"] + 1))))
    ir = None
    if rng.random() < c["reverb_prob"]:
      ir = impulse_response(rng, self.sample_rate, rng.uniform(*c["rt60_s"]), rng.uniform(*c["predelay_s"]),
                            rng.uniform(*c["drr_db"]))
    history = 0 if ir is None else len(ir) - 1  # only a room needs what was played before the crop
    x = np.multiply(pcm[self.context - history:], np.float32(1.0 / 32768.0), dtype=np.float32)  # [history + samples]
    if bands or ir is not None:
      x = filter_audio(x, self.sample_rate, bands, ir)
    x = x[history:]  # [samples] the crop
    if rng.random() < c["noise_prob"]:
      x = add_noise(x, rng, rng.uniform(*c["snr_db"]), float(rng.choice(c["noise_slopes"])))
    level = 10.0 ** (rng.uniform(*c["gain_db"]) / 20.0) if rng.random() < c["gain_prob"] else 1.0
    peak = level * max(float(x.max(initial=0.0)), -float(x.min(initial=0.0)))
    x = x * np.float32(32768.0 * level / max(peak, 1.0))  # [samples] in int16 units, a fresh array
    return np.clip(np.rint(x, out=x), -32768, 32767, out=x).astype(np.int16)
