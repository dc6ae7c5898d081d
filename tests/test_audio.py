"""Tests for hiermt.audio: file loading and the log-mel / CQT front ends."""

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest
import soundfile

from hiermt import audio

SR = audio.SAMPLE_RATE


def _piano_like(seconds, seed=0):
  """Decaying harmonic tones (A2, C4, A4, E6) re-struck every second, plus noise."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * SR)) / SR
  y = np.zeros_like(t)
  for f0, amp in [(110.0, 0.3), (261.63, 0.2), (440.0, 0.15), (1318.5, 0.05)]:
    for h in range(1, 8):
      y += amp / h * np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi))
  y *= np.exp(-(t % 1.0) * 2.0)
  y += 0.01 * rng.standard_normal(len(t))
  return (0.8 * y / np.abs(y).max()).astype(np.float32)


def test_log_mel_matches_librosa():
  y = _piano_like(2.0)
  ours = np.asarray(jax.jit(audio.log_mel)(y[None]))[0]  # [frames, 229]
  mel = librosa.feature.melspectrogram(y=y, sr=SR, n_fft=2048, hop_length=160, n_mels=229, fmin=30, fmax=8000,
                                       center=True, pad_mode="reflect", power=2.0)
  ref = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None).T
  assert ours.shape == ref.shape == (len(y) // 160 + 1, 229)
  # Every bin, every frame, within 0.01 dB.
  np.testing.assert_allclose(ours, ref, atol=0.01, rtol=0)


@pytest.mark.filterwarnings("ignore:n_fft=.*is too large")
def test_cqt_matches_librosa_away_from_edges():
  y = _piano_like(4.0)
  ours = np.asarray(jax.jit(audio.cqt)(y[None]))[0]  # [frames, 352]
  # Full-density filters (sparsity=0): librosa's default drops 1 % of each
  # filter's spectrum, which raises leakage into quiet bins.
  magnitude = np.abs(librosa.cqt(y, sr=SR, hop_length=320, fmin=audio.CQT_FMIN, n_bins=352, bins_per_octave=48,
                                 sparsity=0.0, pad_mode="reflect"))
  # HPPNet's dB scale: 10 * log10 of the magnitude, 80 below the maximum.
  ref = librosa.power_to_db(magnitude, ref=1.0, amin=1e-10, top_db=80.0).T
  assert ours.shape == ref.shape == (len(y) // 320 + 1, 352)
  # librosa computes low octaves on separately padded, downsampled signals, so
  # compare frames at least 0.8 s from either edge, and bins within 20 units
  # (40 dB of magnitude) of the maximum: max abs difference 0.5 units.
  interior = slice(40, -40)
  loud = ref[interior] > ref.max() - 20.0
  error = np.abs(ours[interior] - ref[interior])[loud]
  assert loud.sum() > 1000
  assert error.max() < 0.5, error.max()


@pytest.mark.parametrize("midi", [21, 69, 108])
def test_cqt_peak_bin_is_the_pitch(midi):
  # Bins are a quarter tone apart from a quarter tone below A0: pitch m peaks at 4 (m - 21) + 2.
  t = np.arange(3 * SR) / SR
  y = 0.5 * np.sin(2 * np.pi * librosa.midi_to_hz(midi) * t)
  spec = np.asarray(audio.cqt(y[None].astype(np.float32)))[0]
  assert np.argmax(spec[len(spec) // 2]) == 4 * (midi - 21) + 2


def test_cqt_floor_is_per_example():
  # Digital silence after the tones hits the floor, 80 below the maximum. A
  # quieter copy in the same batch shifts by exactly 10 log10(1e-2) = -20,
  # floor included: the floor follows each example's own maximum.
  y = np.concatenate([_piano_like(1.0), np.zeros(2 * SR, np.float32)])
  spec = np.asarray(audio.cqt(np.stack([y, 1e-2 * y])))
  for example in spec:
    assert example.min() == pytest.approx(example.max() - 80.0, abs=1e-3)
  assert spec[1].max() == pytest.approx(spec[0].max() - 20.0, abs=1e-3)
  loud = spec[0] > spec[0].max() - 40.0  # quiet bins carry float32 rounding of cancelling sums
  np.testing.assert_allclose(spec[1][loud], spec[0][loud] - 20.0, atol=1e-2)


@pytest.mark.parametrize("front_end,hop,bins", [(audio.log_mel, 160, 229), (audio.cqt, 320, 352)])
def test_ten_second_frame_counts(front_end, hop, bins):
  out = jax.eval_shape(front_end, jax.ShapeDtypeStruct((3, 160000), jnp.float32))
  assert out.shape == (3, 160000 // hop + 1, bins)
  assert out.shape[1] == {160: 1001, 320: 501}[hop]


def test_int16_input_is_scaled():
  y = _piano_like(0.5)
  pcm = np.round(y * 32767).astype(np.int16)
  np.testing.assert_allclose(audio.log_mel(pcm[None]), audio.log_mel((pcm / 32768.0)[None].astype(np.float32)),
                             atol=1e-3)


def test_front_ends_reject_unbatched_audio():
  with pytest.raises(ValueError, match=r"\[batch, samples\]"):
    audio.log_mel(np.zeros(16000, np.float32))


def test_load_stereo_44k_wav_resamples_and_mixes(tmp_path):
  rate = 44100
  t = np.arange(rate) / rate  # 1 s
  tone = np.sin(2 * np.pi * 440.0 * t)
  path = tmp_path / "stereo.wav"
  soundfile.write(path, np.stack([0.6 * tone, 0.2 * tone], axis=1), rate, subtype="PCM_16")
  y = audio.load_audio(path)
  assert y.dtype == np.float32 and y.ndim == 1
  assert len(y) == SR
  # Channel mean: amplitude (0.6 + 0.2) / 2, still at 440 Hz.
  assert np.abs(y[1000:-1000]).max() == pytest.approx(0.4, abs=0.01)
  spectrum = np.abs(np.fft.rfft(y))
  assert np.argmax(spectrum) * SR / len(y) == pytest.approx(440.0, abs=1.0)


@pytest.mark.parametrize("suffix", ["flac", "mp3"])
def test_load_compressed_formats(tmp_path, suffix):
  y = _piano_like(1.0)
  path = tmp_path / f"clip.{suffix}"
  soundfile.write(path, y, SR)
  loaded = audio.load_audio(path)
  if suffix == "flac":
    np.testing.assert_allclose(loaded, y, atol=1e-4)  # lossless up to 16-bit quantisation
  else:
    assert abs(len(loaded) - len(y)) < 0.1 * SR  # MP3 adds encoder padding
    assert np.abs(loaded).max() == pytest.approx(np.abs(y).max(), rel=0.2)


def test_corrupt_file_error_names_the_file(tmp_path):
  path = tmp_path / "broken.wav"
  path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
  with pytest.raises(audio.AudioError, match="broken.wav") as info:
    audio.load_audio(path)
  assert isinstance(info.value, ValueError)


def test_missing_file_raises_audio_error(tmp_path):
  with pytest.raises(audio.AudioError, match="nothing.flac"):
    audio.load_audio(tmp_path / "nothing.flac")


def test_pad_or_crop():
  x = np.arange(10, dtype=np.float32)
  np.testing.assert_array_equal(audio.pad_or_crop(x, 4), x[:4])
  padded = audio.pad_or_crop(np.stack([x, x]), 13)
  assert padded.shape == (2, 13)
  np.testing.assert_array_equal(padded[:, 10:], 0)
  np.testing.assert_array_equal(padded[:, :10], np.stack([x, x]))
