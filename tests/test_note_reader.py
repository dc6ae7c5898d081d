"""Tests for the note reader: its logit routes, its roll priors, its key states, and the decoder with it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from hiermt import vocabulary
from hiermt.models import decoder as dec
from hiermt.models import note_reader
from hiermt.models import transcriber

# A small vocabulary: ids 10..21 are times 0..11 at half a frame per time; 100..187 the 88 keys;
# 190..194 five velocities, u = 0, 0.25, ..., 1; 4 note_sustain.
VOCAB, TIMES, KEYS, VELOCITIES, SUSTAIN = 200, (10, 12, 0.5), (100, 88), (190, 5), 4


EOS = 2


def _reader(channels=2, **kw):
  return note_reader.NoteReader(channels, VOCAB, TIMES, KEYS, VELOCITIES, SUSTAIN, **{"end_prior": True, **kw})


def _no_readouts(channels):
  """Parameters of a reader whose learnt readouts are all zero (the decoder's initial reader)."""
  return {"key_readout": {"kernel": np.zeros((channels, 3), np.float32)},
          "note_readout": {"kernel": np.zeros((channels, VOCAB), np.float32)},
          "velocity_readout": {"kernel": np.zeros((channels, 2), np.float32)},
          "written": np.float32(0), "velocity_prior": np.float32(0), "end_prior": np.float32(0)}


def _bias(params, states, rolls, tokens, times, **reader):
  """The reader's logit offsets given key states and rolls directly."""
  written = note_reader.written_times(tokens, times, KEYS, jnp.full((tokens.shape[0], 88), -1))
  return np.asarray(_reader(states.shape[-1], **reader).apply(
      {"params": params}, jnp.asarray(states), jnp.asarray(rolls), tokens, times, written,
      method=lambda r, s, rolls, *a: r(r.read_rolls(s, rolls), *a)))


def test_written_times_carry_each_keys_latest_time():
  tokens = jnp.array([[12, 105, 13, 107, 105, 3]])  # keys 5 and 7 among other ids
  times = jnp.array([[2, 2, 3, 3, 3, 3]])
  start = jnp.full((1, 88), -1).at[0, 7].set(1)  # key 7 written at time 1 by an earlier call
  written = np.asarray(note_reader.written_times(tokens, times, KEYS, start))
  assert written.shape == (1, 6, 88)
  np.testing.assert_array_equal(written[0, :, 5], [-1, 2, 2, 2, 3, 3])
  np.testing.assert_array_equal(written[0, :, 7], [1, 1, 1, 3, 3, 3])
  assert (np.delete(written, [5, 7], axis=2) == -1).all()


def test_routes_add_hand_computed_logits():
  # Two channels per key; readouts: start-here = channel 0, ends-here = channel 1,
  # note-starts = 2 x channel 1. The note readout maps channel 0 to id 150 (x2), channel 1 to 151 (x4);
  # the velocity readout (a, b) = (channel 0, -2 x channel 1); a written key's pitch logit -1.5.
  states = np.zeros((1, 6, 88, 2), np.float32)  # [batch, frames, keys, channels]
  states[0, 0, 7] = 0.8, 0.1
  states[0, 1, 5] = 0.5, 0.25
  states[0, 1, 9] = 0.0, 0.05
  states[0, 2, 5] = 0.0, 1.0
  states[0, 4, 5] = 0.0, 0.75
  note = np.zeros((2, VOCAB), np.float32)
  note[0, 150], note[1, 151] = 2.0, 4.0
  params = _no_readouts(2) | {
      "key_readout": {"kernel": np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 2.0]], np.float32)},
      "note_readout": {"kernel": note},
      "velocity_readout": {"kernel": np.array([[1.0, 0.0], [0.0, -2.0]], np.float32)},
      "written": np.float32(-1.5)}
  # A time token (time 2), key 5's pitch token, another token, the top key's pitch token; all at
  # time 2, i.e. frame 1. The roll priors are off (their scalars 0).
  tokens = jnp.array([[12, 105, 3, 187]])
  times = jnp.array([[2, 2, 2, 2]])
  bias = _bias(params, states, np.full((1, 6, 88, 4), 0.5, np.float32), tokens, times)

  want = np.zeros((1, 4, VOCAB), np.float32)
  # Pitch route: key 5 starts at frame 1 (0.5), once written -1.5 lower; the top key once written.
  want[0, :, 105] = [0.5, -1.0, -1.0, -1.0]
  want[0, 3, 187] = -1.5
  # Time route, times 0..11 at frames 0, 0, 1, 1, ..., 5, 5: the strongest key's note-start
  # readout per frame is 0.2 (key 7), 0.5 (key 5), 2.0 (key 5), 0, 1.5 (key 5), 0. Before the
  # first pitch token it holds everywhere; after key 5 is written (frame 1) key 5 counts again
  # only from frame 4 (3 frames later), key 9's 0.1 is left at frame 1; at a pitch token's own
  # time only keys above it count (none above the top key: 0).
  want[0, 0, 10:22] = [0.2, 0.2, 0.5, 0.5, 2.0, 2.0, 0, 0, 1.5, 1.5, 0, 0]
  want[0, 1, 10:22] = [0.2, 0.2, 0.1, 0.1, 0, 0, 0, 0, 1.5, 1.5, 0, 0]
  want[0, 2, 10:22] = [0.2, 0.2, 0.1, 0.1, 0, 0, 0, 0, 1.5, 1.5, 0, 0]
  want[0, 3, 10:22] = [0.2, 0.2, 0.0, 0.1, 0, 0, 0, 0, 1.5, 1.5, 0, 0]
  # ... plus key 5's end readout after its pitch token.
  want[0, 1, 10:22] += [0, 0, 0.25, 0.25, 1.0, 1.0, 0, 0, 0.75, 0.75, 0, 0]
  want[0, 1, 150], want[0, 1, 151] = 1.0, 1.0  # note route: key 5's state at frame 1, (0.5, 0.25)
  want[0, 1, 190:195] = [0.0, 0.09375, 0.125, 0.09375, 0.0]  # 0.5 u - 0.5 u^2: a bump at u = 0.5
  np.testing.assert_allclose(bias, want, atol=1e-6)


def test_roll_priors_add_hand_computed_logits():
  # Key 5's rolls: frame roll 0.9, 0.9, 0.8, 0.5, 0.1, 0.1 over frames 0..5; onset roll peaking at
  # frame 2, where the velocity roll is 2 / 128 (velocity 2; 100 at frame 1). Its pitch token at time 2
  # (frame 1, f0 = 1) reads the velocity at the onset peak next to it; scalars: velocity 1, end 1/4
  # (the end scores times END_SCALE x 1/4 = 1).
  rolls = np.zeros((1, 6, 88, 4), np.float32)  # [batch, frames, keys, (onset, frame, offset, velocity)]
  rolls[0, :, 5, 1] = 0.9, 0.9, 0.8, 0.5, 0.1, 0.1
  rolls[0, :3, 5, 0] = 0.1, 0.2, 0.8
  rolls[0, 1:3, 5, 3] = 100 / 128, 2 / 128
  rolls[0, 1, 6, 3] = 1.0  # another key's velocity is not read
  params = _no_readouts(2) | {"velocity_prior": np.float32(1.0), "end_prior": np.float32(0.25)}
  tokens, times = jnp.array([[12, 105]]), jnp.array([[2, 2]])
  bias = _bias(params, np.zeros((1, 6, 88, 2), np.float32), rolls, tokens, times)

  want = np.zeros((1, 2, VOCAB), np.float32)
  # Velocities 0..4 against velocity 2, in steps of 4: -log(1 + ((v - 2) / 4)^2).
  want[0, 1, 190:195] = -np.log([1.25, 1.0625, 1.0, 1.0625, 1.25])
  # Times 0..11 name frames 0, 0, 1, 1, ..., 5, 5; a note cannot end before frame f0 + 1 = 2. Ending at
  # frame e: the frame roll's log-odds log(p / (1 - p)) summed over frames 2 .. e - 1.
  odds = {2: np.log(4.0), 3: 0.0, 4: np.log(1 / 9), 5: np.log(1 / 9)}  # frame rolls 0.8, 0.5, 0.1, 0.1
  at = {2: 0.0, 3: odds[2], 4: odds[2] + odds[3], 5: odds[2] + odds[3] + odds[4]}
  want[0, 1, 10:22] = [at[max(t // 2, 2)] for t in range(12)]
  want[0, 1, SUSTAIN] = sum(odds.values())  # held through the last frame
  np.testing.assert_allclose(bias, want, rtol=1e-5, atol=1e-6)


def test_the_onset_prior_adds_hand_computed_logits():
  # Onset rolls over frames 0..5: key 5 0.8 at frame 1, key 9 0.5 at frame 1, key 7 0.9 at frame 3
  # with a shoulder of 0.6 at frame 4 (not a peak: the same onset); every other value clips to
  # ONSET_EPS. Learnt readouts and the other priors 0, onset prior 1.
  rolls = np.zeros((1, 6, 88, 4), np.float32)
  rolls[0, 1, 5, 0], rolls[0, 1, 9, 0], rolls[0, 3:5, 7, 0] = 0.8, 0.5, (0.9, 0.6)
  params = _no_readouts(2) | {"onset_prior": np.float32(1.0)}
  # Time 2 (frame 1), key 5, time 2 again, key 9; then the end of the notes.
  tokens, times = jnp.array([[12, 105, 12, 109]]), jnp.array([[2, 2, 2, 2]])
  bias = _bias(params, np.zeros((1, 6, 88, 2), np.float32), rolls, tokens, times, eos_token=EOS, onset_prior=True)
  log, eps = np.log, note_reader.ONSET_EPS
  quiet = np.log1p(-eps)  # log(1 - p) of a key without an onset

  # At a time token: key j's onset (its frame or a neighbour), no free key below it. Key 7 peaks at
  # frame 3, two frames on: at frame 1 it reads eps. Key 5 once written is out (eps), and stops counting.
  first = bias[0, 0, 100:188]
  np.testing.assert_allclose(first[[5, 9, 7]], [log(0.8) + 5 * quiet, log(0.5) + log(0.2) + 8 * quiet,
                                                 log(eps) + log(0.2) + 6 * quiet], rtol=1e-5)
  again = bias[0, 2, 100:188]
  np.testing.assert_allclose(again[[5, 9, 0]], [log(eps), log(0.5) + 8 * quiet, log(eps)], rtol=1e-5)

  # After key 5's pitch token, time steps 0..11 are frames 0,0,1,1,..,5,5 (half a frame per step), and each
  # step's no-onset log-probability is half its frame's. Step 2 (the time reached): only keys above
  # key 5 (81 quiet, key 9); step 3: every key but key 5 (86 quiet, key 9); steps 4-7 (frames 2-3,
  # within 2 frames of key 5's note): every key but key 5; steps 8-10 every key (key 7's shoulder at
  # frame 4 counts as no onset); step 11 is the end of the segment, where no note starts.
  none = np.zeros(12)
  none[2], none[3] = 0.5 * (log(0.5) + 81 * quiet), 0.5 * (log(0.5) + 86 * quiet)
  none[4:6] = 0.5 * 87 * quiet
  none[6:8] = 0.5 * (log(0.1) + 86 * quiet)
  none[8:11] = 0.5 * 88 * quiet
  want = np.zeros(12)
  want[2:11] = np.cumsum(none)[2:11] - none[2:11] + log(-np.expm1(none[2:11]))
  np.testing.assert_allclose(bias[0, 1, 10:22], want, rtol=1e-4)
  np.testing.assert_allclose(bias[0, 1, EOS], none.sum(), rtol=1e-4)
  # The prior is a distribution over the next time and <eos>.
  np.testing.assert_allclose(np.exp(want[2:11]).sum() + np.exp(none.sum()), 1.0, rtol=1e-5)
  # After key 9 (above it only quiet keys at step 2) the likeliest next onset is key 7's, at step 6
  # (steps before the time reached get 0: the grammar rules them out).
  assert 2 + np.argmax(bias[0, 3, 12:21]) == 6 and bias[0, 3, 16] > bias[0, 3, EOS]


def test_velocity_is_read_at_the_onset_peak_next_to_a_frame():
  # One key over 5 frames: onset roll 0.1, 0.3, 0.9, 0.2, 0.2; velocity roll 10, 20, 30, 40, 50 (/ 128).
  onset = np.array([0.1, 0.3, 0.9, 0.2, 0.2], np.float32).reshape(1, 5, 1)
  velocity = np.array([10, 20, 30, 40, 50], np.float32).reshape(1, 5, 1) / 128
  read = note_reader._velocity_at_onset_peaks(jnp.asarray(onset), jnp.asarray(velocity)) * 128
  # Frame 0 looks at 0..1 (peak 1), frames 1..3 see the peak at 2, frame 4 ties 3 and keeps itself.
  np.testing.assert_allclose(np.asarray(read)[0, :, 0], [20, 30, 30, 30, 50], rtol=1e-6)


def test_key_states_read_each_key_by_its_own_rolls():
  # Features interleave the 4 rolls per key: key k's are columns 4k..4k+3.
  reader = _reader(channels=3)
  features = jax.random.uniform(jax.random.key(0), (1, 20, 352))
  params = reader.init(jax.random.key(1), features, method=reader.states)["params"]
  states = reader.apply({"params": params}, features, method=reader.states)
  assert states.shape == (1, 20, 88, 3)
  # Key 9 given key 40's rolls gets key 40's states (weights shared by keys); no other key moves.
  copied = features.at[:, :, 36:40].set(features[:, :, 160:164])
  moved = reader.apply({"params": params}, copied, method=reader.states)
  np.testing.assert_allclose(moved[:, :, 9], states[:, :, 40], atol=1e-6)
  np.testing.assert_array_equal(np.delete(moved, 9, axis=2), np.delete(states, 9, axis=2))
  # Two 5-frame convolutions: a change at frame 10 reaches frames 6..14 only.
  nudged = reader.apply({"params": params}, features.at[:, 10].add(1.0), method=reader.states)
  changed = np.flatnonzero(np.abs(np.asarray(nudged - states)).max(axis=(0, 2, 3)) > 0)
  np.testing.assert_array_equal(changed, np.arange(6, 15))
  with pytest.raises(ValueError, match="per-key encoder features"):
    reader.apply({"params": params}, features[:, :, :300], method=reader.states)
  with pytest.raises(ValueError, match="per-key encoder features"):  # 88 keys, but not HPPNet's 4 rolls
    reader.apply({"params": params}, features[:, :, :264], method=reader.states)


def _decoder(**kw):
  return dec.Decoder(vocab_size=vocabulary.VOCAB_SIZE, num_layers=2, num_heads=4, dim=32, max_len=12, prefix_pool=2,
                     time_tokens=(vocabulary.TIME_OFFSET, vocabulary.NUM_TIMES, 0.25),
                     key_tokens=(vocabulary.PITCH_OFFSET + 21, 88),
                     velocity_tokens=(vocabulary.VELOCITY_OFFSET, vocabulary.NUM_VELOCITIES),
                     sustain_token=vocabulary.NOTE_SUSTAIN, **kw)


def _inputs():
  k1, k2 = jax.random.split(jax.random.key(0))
  return (jax.random.randint(k1, (2, 12), 0, vocabulary.VOCAB_SIZE),
          jax.random.uniform(k2, (2, 30, 352)))  # 30 HPPNet frames, 15 pooled prefix frames


def test_a_fresh_reader_adds_only_its_velocity_and_end_priors():
  # Learnt readouts start at zero, the velocity and end priors at their inits: a fresh reader moves the
  # velocity, time and note_sustain logits only, and with both priors at zero it leaves the decoder unchanged.
  tokens, audio = _inputs()
  params = _decoder(note_reader=8, end_prior=True).init(jax.random.key(1), tokens, audio)["params"]
  assert float(params["note_reader"]["velocity_prior"]) == note_reader.VELOCITY_PRIOR_INIT > 0
  assert float(params["note_reader"]["end_prior"]) == pytest.approx(1 / note_reader.END_SCALE)
  with_reader = np.asarray(_decoder(note_reader=8, end_prior=True).apply({"params": params}, tokens, audio))
  plain = np.asarray(_decoder().apply({"params": {k: v for k, v in params.items() if k != "note_reader"}},
                                      tokens, audio))
  velocities = np.arange(vocabulary.VELOCITY_OFFSET, vocabulary.VELOCITY_OFFSET + vocabulary.NUM_VELOCITIES)
  ends = np.append(np.arange(vocabulary.TIME_OFFSET, vocabulary.TIME_OFFSET + vocabulary.NUM_TIMES),
                   vocabulary.NOTE_SUSTAIN)
  moved = np.abs(with_reader - plain).max(axis=(0, 1)) > 0  # [vocab]
  assert moved[velocities].any() and moved[ends].any()
  assert not np.delete(moved, np.concatenate([velocities, ends])).any()
  no_prior = {**params, "note_reader": {**params["note_reader"], "velocity_prior": np.float32(0),
                                        "end_prior": np.float32(0)}}
  np.testing.assert_array_equal(
      _decoder(note_reader=8, end_prior=True).apply({"params": no_prior}, tokens, audio), plain)
  # Without the end prior (onset_pitch, velocity) the reader has no end weight and moves velocities only.
  without = {**params, "note_reader": {k: v for k, v in params["note_reader"].items() if k != "end_prior"}}
  moved = np.abs(np.asarray(_decoder(note_reader=8).apply({"params": without}, tokens, audio))
                 - plain).max(axis=(0, 1)) > 0
  assert moved[velocities].any() and not np.delete(moved, velocities).any()
  assert "end_prior" not in _decoder(note_reader=8).init(jax.random.key(1), tokens, audio)["params"]["note_reader"]


def test_the_onset_prior_needs_the_reader_and_eos():
  tokens, audio = _inputs()
  with pytest.raises(ValueError, match="needs Decoder.note_reader > 0"):
    _decoder(onset_prior=True, eos_token=vocabulary.EOS).init(jax.random.key(0), tokens, audio)
  with pytest.raises(ValueError, match="needs eos_token"):
    _decoder(note_reader=8, onset_prior=True).init(jax.random.key(0), tokens, audio)


@pytest.mark.parametrize("onset_prior", [False, True])
def test_cached_decoding_matches_full_forward_with_the_reader(onset_prior):
  # As the stages use them: onset_pitch reads the onset prior and no end prior.
  model = _decoder(note_reader=8, onset_prior=onset_prior, end_prior=not onset_prior, eos_token=vocabulary.EOS)
  tokens, audio = _inputs()
  # Notes at times 4 and 5 (both encoder frame 2), key 39 twice: the keys written carry across calls.
  time, key = vocabulary.TIME_OFFSET, vocabulary.PITCH_OFFSET + 21
  tokens = tokens.at[:, :8].set(jnp.array([time + 4, key + 39, time + 5, key + 40, key + 39, time + 5,
                                           key + 39, time + 5]))
  params = model.init(jax.random.key(1), tokens, audio)["params"]
  params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(2), x.shape), params)  # readouts != 0
  full = model.apply({"params": params}, tokens, audio)
  cache, out, start = model.init_cache(audio), [], 0
  call = lambda cache, chunk, audio: model.apply({"params": params, "cache": cache}, chunk, audio,  # noqa: E731
                                                 decode=True, mutable=["cache"])
  for i, size in enumerate((2, 1, 1, 4, 4)):  # the time reached, key states and keys written carry across calls
    before = cache
    logits, mutated = call(cache, tokens[:, start:start + size], audio if i == 0 else None)
    cache, start = mutated["cache"], start + size
    out.append(logits)
  # rtol: with the onset prior <eos> sums no-onset log-probabilities of random rolls (~-5e4).
  np.testing.assert_allclose(jnp.concatenate(out, axis=1), full, atol=1e-4, rtol=1e-6)
  # Forgetting the keys written before the last call (key 39 at time 5) changes its logits.
  forgot = dict(before, keys_written=jnp.full_like(before["keys_written"], -1))
  assert np.abs(np.asarray(call(forgot, tokens[:, 8:], None)[0] - out[-1])).max() > 1e-3
  plain = {k: v for k, v in params.items() if k != "note_reader"}
  assert np.abs(np.asarray(full - _decoder().apply({"params": plain}, tokens, audio))).max() > 1e-2


def test_a_carried_note_is_read_from_the_segments_start():
  # Offset layout, two notes carried in (`note_sustain key end`): key 39 ending at time 20, then key 41.
  # Key 41 sounds from the segment's start: its end prior reads its rolls from time 0, not from 20.
  model = _decoder(note_reader=8, end_prior=True)
  time, key, sustain = vocabulary.TIME_OFFSET, vocabulary.PITCH_OFFSET + 21, vocabulary.NOTE_SUSTAIN
  tokens = jnp.array([[vocabulary.SOS, vocabulary.TASK_IDS["offset"], sustain, key + 39, time + 20, sustain,
                       key + 41, time + 3]])
  audio = jax.random.uniform(jax.random.key(3), (1, 30, 352))
  params = model.init(jax.random.key(1), tokens, audio)["params"]
  # Learnt readouts and the velocity prior zero: the reader's logits are the end prior alone.
  zeros = jax.tree.map(jnp.zeros_like, {k: v for k, v in params["note_reader"].items() if not k.startswith("conv")})
  reader_params = {**params["note_reader"], **zeros, "end_prior": np.float32(0.25)}
  channels = params["note_reader"]["conv_out"]["kernel"].shape[-1]
  plain = {k: v for k, v in params.items() if k != "note_reader"}
  bias = (model.apply({"params": {**plain, "note_reader": reader_params}}, tokens, audio)
          - _decoder().apply({"params": plain}, tokens, audio))  # [1, 8, vocab]: the reader's logits
  reader = note_reader.NoteReader(channels, vocabulary.VOCAB_SIZE, (time, vocabulary.NUM_TIMES, 0.5), (key, 88),
                                  (vocabulary.VELOCITY_OFFSET, vocabulary.NUM_VELOCITIES), sustain, end_prior=True)

  def read_at(t):  # the reader's logits at key 41's pitch token read at time t
    times = jnp.array([[t]])
    written = note_reader.written_times(tokens[:, 6:7], times, (key, 88), jnp.full((1, 88), -1))
    return reader.apply({"params": reader_params}, audio, tokens[:, 6:7], times, written,
                        method=lambda r, a, *args: r(r.maps(a), *args))[0, 0]

  np.testing.assert_allclose(bias[0, 6], read_at(0), atol=1e-4)
  assert np.abs(np.asarray(read_at(20) - read_at(0))).max() > 0.1  # the frame read matters
  # The decode cache carries the reader's time across calls.
  cache = model.init_cache(audio)
  out = []
  for i, chunk in enumerate((tokens[:, :5], tokens[:, 5:6], tokens[:, 6:])):
    logits, mutated = model.apply({"params": {**plain, "note_reader": reader_params}, "cache": cache}, chunk,
                                  audio if i == 0 else None, decode=True, mutable=["cache"])
    cache = mutated["cache"]
    out.append(logits)
  np.testing.assert_allclose(jnp.concatenate(out, axis=1),
                             model.apply({"params": {**plain, "note_reader": reader_params}}, tokens, audio),
                             atol=1e-4)


def test_the_config_maps_the_reader_and_refuses_the_crnn():
  config = base.get_config("offset,encoder=hppnet,runlocal")
  assert transcriber.build_decoder(config).note_reader == 0
  config.decoder.note_reader = 16
  assert transcriber.build_decoder(config).key_tokens == (vocabulary.PITCH_OFFSET + 21, 88)
  del config.decoder["note_reader"]  # a config.json saved before the option existed
  assert transcriber.build_decoder(config).note_reader == 0
  config.decoder.note_reader = 16
  config.decoder.onset_prior = True  # a prior over the next onset: offset writes an end time there
  assert not transcriber.build_decoder(config).onset_prior
  config = base.get_config("onset_pitch,encoder=hppnet,runlocal")
  config.decoder.onset_prior = True
  with pytest.raises(ValueError, match="onset_prior is a prior of the note reader"):
    transcriber.build_decoder(config)
  config.decoder.note_reader = 16
  assert transcriber.build_decoder(config).onset_prior
  # The end prior where a pitch token is followed by its note's end.
  for stage, end_prior in (("onset_pitch", False), ("velocity", False), ("offset", True), ("flatten", True)):
    config = base.get_config(f"{stage},encoder=hppnet,runlocal")
    config.decoder.note_reader = 16
    assert transcriber.build_decoder(config).end_prior == end_prior, stage
  config = base.get_config("offset,encoder=crnn,runlocal")
  config.decoder.note_reader = 16
  with pytest.raises(ValueError, match="only HPPNet"):
    transcriber.build_decoder(config)
  with pytest.raises(ValueError, match="key_tokens"):
    dec.Decoder(vocab_size=10, num_layers=1, num_heads=2, dim=8, max_len=4, time_tokens=(0, 4, 1.0),
                note_reader=4).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 3, 352)))
