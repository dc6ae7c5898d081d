"""data/augment.py: the math of each effect against hand-computed values, and the chain's contract."""

import numpy as np
import pytest

from conftest import load_base_config
from hiermt.data import augment

SR = 16000


def _sine(hz, seconds=1.0, amplitude=0.5):
  return (amplitude * np.sin(2 * np.pi * hz * np.arange(int(seconds * SR)) / SR)).astype(np.float32)


def _power_db(x):
  return 10 * np.log10(np.mean(np.square(x, dtype=np.float64)))


def _config(**overrides):
  return {**load_base_config().get_config("encoder").data.augment.to_dict(), **overrides}


def _gain_only(db):
  return augment.Augmenter(_config(gain_prob=1.0, gain_db=(db, db), eq_prob=0.0, reverb_prob=0.0, noise_prob=0.0), SR)


def test_gain_in_decibels():
  double = _gain_only(20 * np.log10(2.0))  # +6.0206 dB
  pcm = np.random.default_rng(0).integers(-16000, 16000, double.context + 1000).astype(np.int16)
  np.testing.assert_array_equal(double(pcm, np.random.default_rng(0)), 2 * pcm[double.context:])
  tenth = _gain_only(-20.0)(pcm, np.random.default_rng(0))
  np.testing.assert_array_equal(tenth, np.rint(pcm[double.context:] / 10.0).astype(np.int16))


def test_eq_curve_hand_computed():
  freqs = np.array([125.0, 1000.0, 2000.0, 8000.0])
  np.testing.assert_allclose(augment.eq_db(freqs, [("peak", 1000.0, 6.0, 1.0)]),
                             [6 * np.exp(-0.5 * 9), 6.0, 6 * np.exp(-0.5), 6 * np.exp(-0.5 * 9)], rtol=1e-5)
  # Shelves: half their gain at the corner, nearly all of it two widths away on their side.
  low = augment.eq_db(freqs, [("low_shelf", 1000.0, -12.0, 0.5)])
  np.testing.assert_allclose(low[1], -6.0, rtol=1e-6)
  np.testing.assert_allclose(low[[0, 3]], [-12 / (1 + np.exp(-24)), -12 / (1 + np.exp(16))], atol=1e-5)
  high = augment.eq_db(freqs, [("high_shelf", 2000.0, 8.0, 1.0)])
  np.testing.assert_allclose(high, [8 / (1 + np.exp(16)), 8 / (1 + np.exp(4)), 4.0, 8 / (1 + np.exp(-8))], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="kind"):
    augment.eq_db(freqs, [("notch", 1000.0, 6.0, 1.0)])


def test_eq_filters_by_its_curve_and_flat_eq_is_the_identity():
  x = np.random.default_rng(1).uniform(-0.5, 0.5, SR).astype(np.float32)
  flat = [("peak", 300.0, 0.0, 0.5), ("low_shelf", 100.0, 0.0, 1.0), ("high_shelf", 4000.0, 0.0, 1.0)]
  np.testing.assert_allclose(augment.filter_audio(x, SR, flat), x, atol=1e-6)
  # A sine's level changes by the curve's value at its frequency (+6 dB at the peak, +3.64 dB an octave off).
  bands = [("peak", 1000.0, 6.0, 1.0)]
  for hz, want_db in ((1000.0, 6.0), (2000.0, 6 * np.exp(-0.5))):
    y = augment.filter_audio(_sine(hz), SR, bands)
    middle = slice(SR // 4, 3 * SR // 4)  # away from the ends' ringing
    assert _power_db(y[middle]) - _power_db(_sine(hz)[middle]) == pytest.approx(want_db, abs=0.05)


def test_impulse_response_direct_path_decay_and_ratio():
  rt60, predelay, drr = 0.5, 0.01, 6.0
  ir = augment.impulse_response(np.random.default_rng(0), SR, rt60, predelay, drr)
  start = int(predelay * SR)
  assert ir[0] == 1.0 and not ir[1:start].any() and ir[start] != 0.0  # direct sound at lag 0, then the pre-delay
  assert len(ir) == start + int(rt60 * SR)
  tail = ir[start:].astype(np.float64)
  assert 10 * np.log10(1.0 / np.sum(tail**2)) == pytest.approx(drr, abs=1e-3)
  # Energy in 10 ms windows falls along a line that loses 60 dB in one RT60.
  windows = np.square(tail[:len(tail) // 160 * 160]).reshape(-1, 160).sum(axis=1)  # [windows]
  t = (np.arange(len(windows)) + 0.5) * 0.01
  slope, _ = np.polyfit(t, 10 * np.log10(windows), 1)
  assert slope * rt60 == pytest.approx(-60.0, abs=2.0)


def test_reverb_is_a_causal_linear_convolution():
  rng = np.random.default_rng(2)
  ir = augment.impulse_response(rng, SR, 0.1, 0.005, 3.0)
  x = rng.uniform(-0.5, 0.5, 4000).astype(np.float32)
  np.testing.assert_allclose(augment.filter_audio(x, SR, ir=ir), np.convolve(x, ir)[:len(x)], atol=2e-5)
  click = np.zeros(3000, np.float32)
  click[1000] = 1.0
  y = augment.filter_audio(click, SR, ir=ir)
  assert np.abs(y[:1000]).max() < 1e-6 and y[1000] == pytest.approx(1.0, abs=1e-5)  # nothing moves earlier


@pytest.mark.parametrize("slope, high_vs_low_db", [(0.0, 12.04), (1.0, 0.0)])
def test_noise_snr_and_colour(slope, high_vs_low_db):
  x = _sine(440.0, 2.0, 0.3)
  y = augment.add_noise(x, np.random.default_rng(3), 23.0, slope)
  noise = (y - x).astype(np.float64)
  assert _power_db(x) - _power_db(noise) == pytest.approx(23.0, abs=0.1)
  # White noise has 16x the power in 4-8 kHz as in 250-500 Hz (16x the bandwidth); pink the same power.
  spectrum = np.abs(np.fft.rfft(noise))**2
  freqs = np.fft.rfftfreq(len(noise), 1 / SR)
  band = lambda lo, hi: spectrum[(freqs >= lo) & (freqs < hi)].sum()
  assert 10 * np.log10(band(4000, 8000) / band(250, 500)) == pytest.approx(high_vs_low_db, abs=1.0)
  silent = np.zeros(100, np.float32)
  assert augment.add_noise(silent, np.random.default_rng(3), 23.0, slope) is silent


def test_augmenter_is_deterministic_per_stream_and_varies_across_them():
  aug = augment.Augmenter(_config(eq_prob=1.0, reverb_prob=1.0, noise_prob=1.0), SR)
  longest = augment.impulse_response(np.random.default_rng(0), SR, 1.2, 0.03, 0.0)  # the configured maxima
  assert aug.context == len(longest) == round(0.03 * SR) + round(1.2 * SR)
  pcm = (np.random.default_rng(4).uniform(-0.3, 0.3, aug.context + 2 * SR) * 32768).astype(np.int16)
  a = aug(pcm, np.random.default_rng((0, 5, 1)))
  assert a.shape == (2 * SR,) and a.dtype == np.int16
  np.testing.assert_array_equal(a, aug(pcm, np.random.default_rng((0, 5, 1))))
  assert not np.array_equal(a, aug(pcm, np.random.default_rng((0, 6, 1))))
  assert not np.array_equal(a, pcm[aug.context:])


def test_augmenter_without_effects_returns_the_crop_and_never_clips():
  idle = augment.Augmenter(_config(gain_prob=0.0, eq_prob=0.0, reverb_prob=0.0, noise_prob=0.0), SR)
  pcm = (np.random.default_rng(5).uniform(-0.9, 0.9, idle.context + SR) * 32768).astype(np.int16)
  np.testing.assert_array_equal(idle(pcm, np.random.default_rng(0)), pcm[idle.context:])
  out = _gain_only(12.0)(pcm, np.random.default_rng(0)).astype(np.float64)
  crop = pcm[idle.context:].astype(np.float64)
  # Scaled down to full scale rather than clipped: still proportional to the input.
  assert np.abs(out).max() >= 32766
  np.testing.assert_allclose(out, crop * (np.abs(out).max() / np.abs(crop).max()), atol=1.0)


def test_augmenter_room_keeps_the_crop_in_place_and_hears_what_came_before():
  room = augment.Augmenter(_config(gain_prob=0.0, eq_prob=0.0, reverb_prob=1.0, noise_prob=0.0,
                                   rt60_s=(0.5, 0.5), predelay_s=(0.01, 0.01), drr_db=(0.0, 0.0)), SR)
  pcm = np.zeros(room.context + SR, np.int16)
  pcm[room.context + 1000] = 16384  # a click 1000 samples into the crop
  out = room(pcm, np.random.default_rng(0))
  assert out[1000] == 16384 and not out[:1000].any()  # direct sound in place, nothing earlier
  assert np.abs(out[1001 + 160:1000 + 8000]).max() > 0  # its reverberation after the pre-delay
  before = np.zeros_like(pcm)
  before[room.context - 100] = 16384  # a click just before the crop: only its reverberation is in it
  assert np.abs(room(before, np.random.default_rng(0))[:4000]).max() > 0
