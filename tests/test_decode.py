"""Tests for greedy decoding: cached loops == full recompute, and the note grammar."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiermt import decode
from hiermt import vocabulary as vocab
from hiermt.models import transcriber

# Up to 13 onset_pitch notes. The full-recompute references compile once per length, so the
# length is most of this file's time (the file: 146 s at 40 tokens, 119 s at 28, 2-core machine).
MAX_LEN = 28


@functools.cache
def _model(stage, conditioning, dtype="float32"):
  """conditioning: "prefix", "cross", or "prefix-time" (prefix with half the rotary features on
  time positions, `decoder.rope_time=0.5`)."""
  from conftest import load_base_config
  config = load_base_config().get_config(f"{stage},runlocal,conditioning={conditioning.split('-')[0]}")
  config.decoder.rope_time = 0.5 if conditioning == "prefix-time" else 0.0
  config.data.max_tokens = MAX_LEN
  config.train.dtype = dtype
  model = transcriber.build_model(config)
  audio = jnp.zeros((1, 16000), jnp.float32)
  variables = model.init(jax.random.key(1), audio, jnp.zeros((1, MAX_LEN), jnp.int32), train=False)
  features = jax.random.normal(jax.random.key(2), (3, 26, model.encoder.feature_dim))  # [batch, frames, d_enc]
  # Random weights give near-uniform logits; scaling the head makes the choices decisive.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x * 30 if "head" in jax.tree_util.keystr(path) else x, variables["params"])
  return model, params, features


def _check_grammar(stage, tokens):
  """Every written sequence parses as the stage's layout without skipping a token."""
  tokens = [t for t in tokens.tolist() if t != vocab.PAD]
  assert tokens[:2] == [vocab.SOS, vocab.TASK_IDS[stage]]
  body = tokens[2:-1] if tokens[-1] == vocab.EOS else tokens[2:]
  group = len(vocab.LAYOUTS[stage])
  complete = body[:len(body) // group * group]
  decoded = vocab.decode_segment(tokens, stage)
  assert len(decoded["pitch"]) == len(complete) // group  # nothing dropped by the tolerant parser
  on = decoded["onset"]
  timed = on[on != vocab.SUSTAIN_STEP]
  assert np.all(np.diff(timed) >= 0) and np.all(timed < 1000)
  if vocab.SUSTAIN_STEP in on:  # carried notes first
    assert np.all(on[:np.sum(on == vocab.SUSTAIN_STEP)] == vocab.SUSTAIN_STEP)
  assert np.all((decoded["pitch"] >= 21) & (decoded["pitch"] <= 108))


@pytest.mark.parametrize("conditioning", ["prefix", "cross", "prefix-time"])
@pytest.mark.parametrize("stage", ["onset_pitch", "flatten"])
def test_free_run_equals_full_recompute(stage, conditioning):
  model, params, features = _model(stage, conditioning)
  cached, probs = map(np.asarray, decode.jitted(model, stage, MAX_LEN)(params, features))
  reference, reference_probs = decode.decode_uncached(model, stage, MAX_LEN, params, features)
  np.testing.assert_array_equal(cached, reference)
  np.testing.assert_allclose(probs, reference_probs, atol=1e-4)
  assert len({tuple(row) for row in cached}) > 1  # the audio matters
  for row in cached:
    _check_grammar(stage, row)
  # A probability for every written token, none for the prompt and the padding.
  written = cached != vocab.PAD
  written[:, :2] = False
  assert np.all((probs[written] > 0) & (probs[written] <= 1 + 1e-6)) and np.all(probs[~written] == 0)


def test_written_probabilities_are_the_softmax_over_the_allowed_tokens():
  # The first token after <sos> <task>: allowed are the 1000 onset times and <eos> (no note yet).
  model, params, features = _model("onset_pitch", "prefix")
  tokens, probs = map(np.asarray, decode.jitted(model, "onset_pitch", 3)(params, features))
  logits = np.asarray(decode._uncached_forward(model)(params, jnp.asarray(tokens[:1, :2]), features[:1]))[0]
  allowed = np.r_[[vocab.EOS], vocab.time_id(np.arange(1000))]
  chosen = logits[allowed]
  want = 1.0 / np.exp(chosen - chosen.max()).sum()  # the argmax's share of the softmax
  assert tokens[0, 2] == allowed[np.argmax(chosen)]
  np.testing.assert_allclose(probs[0, 2], want, rtol=1e-4)


def test_an_unsure_pitch_closes_its_onset_time():
  # The threshold: the median probability of the pitches written without one, so some fall below.
  model, params, features = _model("onset_pitch", "prefix")
  run = decode.jitted(model, "onset_pitch", MAX_LEN)
  tokens, probs = map(np.asarray, run(params, features))
  is_pitch = (tokens >= vocab.PITCH_OFFSET) & (tokens < vocab.PITCH_OFFSET + vocab.NUM_PITCHES)
  threshold = float(np.median(probs[is_pitch]))
  cached, cached_probs = map(np.asarray, run(params, features, None, threshold))
  reference, reference_probs = decode.decode_uncached(model, "onset_pitch", MAX_LEN, params, features,
                                                      min_pitch_prob=threshold)
  np.testing.assert_array_equal(cached, reference)
  np.testing.assert_allclose(cached_probs, reference_probs, atol=1e-4)
  closed = 0
  for row, row_probs in zip(cached, cached_probs):
    _check_grammar("onset_pitch", row)
    for i in range(3, MAX_LEN - 2, 2):  # pitch tokens sit at odd positions; the next note's time after them
      if vocab.PITCH_OFFSET <= row[i] < vocab.PITCH_OFFSET + vocab.NUM_PITCHES and row_probs[i] < threshold \
          and vocab.TIME_OFFSET <= row[i + 1] < vocab.TIME_OFFSET + vocab.NUM_TIMES:
        assert row[i + 1] > row[i - 1]  # a later onset
        closed += 1
  assert closed > 0
  assert not np.array_equal(cached, tokens)  # the rule changed what was written


def test_unsure_notes_are_dropped_with_their_time_token():
  t, p = vocab.time_id, vocab.pitch_id
  tokens = np.array([[vocab.SOS, 5, t(10), p(60), t(10), p(64), t(20), p(62), vocab.EOS, vocab.PAD]])
  probs = np.array([[0, 0, 0.9, 0.95, 0.8, 0.3, 0.6, 0.7, 0.9, 0]])
  kept = decode.drop_unsure_notes(tokens, probs, 0.5)
  np.testing.assert_array_equal(kept, [[vocab.SOS, 5, t(10), p(60), vocab.PAD, vocab.PAD, t(20), p(62),
                                        vocab.EOS, vocab.PAD]])
  decoded = vocab.decode_segment(kept[0], "onset_pitch")
  np.testing.assert_array_equal(decoded["pitch"], [60, 62])
  np.testing.assert_array_equal(decoded["onset"], [10, 20])
  np.testing.assert_array_equal(decode.drop_unsure_notes(tokens, probs, 0.0), tokens)  # 0 keeps all


def test_flatten_carries_only_the_pitches_allowed():
  # Row 0 is a piece's first segment (nothing carried), row 1 may carry C4 and E4, row 2 anything.
  model, params, features = _model("flatten", "prefix")
  carriable = np.zeros((3, vocab.NUM_PITCHES), bool)
  carriable[1, [60, 64]] = True
  carriable[2] = True
  cached = np.asarray(decode.jitted(model, "flatten", MAX_LEN)(params, features, carriable)[0])
  reference = decode.decode_uncached(model, "flatten", MAX_LEN, params, features, carriable=carriable)[0]
  np.testing.assert_array_equal(cached, reference)
  for row, allowed in zip(cached, carriable):
    _check_grammar("flatten", row)
    decoded = vocab.decode_segment(row, "flatten")
    carried = decoded["pitch"][decoded["onset"] == vocab.SUSTAIN_STEP]
    assert np.all(allowed[carried]) and np.all(np.diff(carried) > 0)
  assert not np.any(vocab.decode_segment(cached[0], "flatten")["onset"] == vocab.SUSTAIN_STEP)


def test_banning_eos_fills_every_row_in_both_strategies():
  model, params, features = _model("onset_pitch", "cross")
  max_len = 12
  cached = np.asarray(decode.jitted(model, "onset_pitch", max_len, stop_at_eos=False)(params, features)[0])
  reference = decode.decode_uncached(model, "onset_pitch", max_len, params, features, stop_at_eos=False)[0]
  np.testing.assert_array_equal(cached, reference)
  assert not np.any(cached == vocab.EOS) and not np.any(cached == vocab.PAD)
  with pytest.raises(ValueError, match="no room"):
    decode.free_run(model, "onset_pitch", 2, params, features)


@pytest.mark.parametrize("conditioning", ["prefix", "cross", "prefix-time"])
@pytest.mark.parametrize("stage", ["velocity", "offset"])
def test_forced_run_equals_full_recompute(stage, conditioning):
  model, params, features = _model(stage, conditioning)
  on = vocab.time_id(np.array([[0, 5, 5, 900], [3, 400, 0, 0], [0, 0, 0, 0]])).astype(np.int32)
  if stage == "offset":
    on[0, 0] = vocab.NOTE_SUSTAIN
  pitch = vocab.pitch_id(np.array([[60, 40, 64, 100], [21, 108, 0, 0], [0, 0, 0, 0]])).astype(np.int32)
  num_notes = np.array([4, 2, 0], np.int32)
  cached = np.asarray(decode.jitted(model, stage, MAX_LEN)(params, features, on, pitch, num_notes))
  reference = decode.decode_uncached(model, stage, MAX_LEN, params, features, on, pitch, num_notes)
  np.testing.assert_array_equal(cached, reference)
  assert np.all(cached[1, 2:] == vocab.PAD) and np.all(cached[2] == vocab.PAD)
  answers = cached[0]
  if stage == "velocity":
    assert np.all((answers >= vocab.velocity_id(1)) & (answers <= vocab.velocity_id(127)))
  else:
    onsets = np.array([-1, 5, 5, 900])
    timed = answers != vocab.NOTE_SUSTAIN
    assert np.all(vocab.id_to_step(answers[timed]) > np.maximum(onsets[timed], 0))
    assert np.all(vocab.id_to_step(answers[timed]) <= 1000)


@pytest.mark.parametrize("stage", ["onset_pitch", "velocity"])
def test_bfloat16_decoding_casts_the_weights_once_and_equals_its_full_recompute(stage):
  """transcribe --dtype=bfloat16: the loop reads bfloat16 matrices (half the bytes per call), cast from the
  float32 checkpoint once per call, and writes what the grammar allows. (Exact equality with the full
  recompute is pinned in float32 only: in bfloat16 the cache's and the recompute's roundings differ, and a
  near-tie can flip a token, as one row of three here did at its 15th token.)"""
  model, params, features = _model(stage, "prefix", "bfloat16")
  cast = decode.weights_in_compute_dtype(model, params)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(cast)):
    assert x.dtype == jnp.float32 and y.dtype == (jnp.bfloat16 if x.ndim >= 2 else jnp.float32)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(x.astype(y.dtype), np.float32))
  assert decode.weights_in_compute_dtype(_model(stage, "prefix")[0], params) is params  # float32: untouched
  extra = ()
  if stage == "velocity":
    on = vocab.time_id(np.array([[0, 5, 900]] * 3)).astype(np.int32)
    pitch = vocab.pitch_id(np.array([[60, 40, 100]] * 3)).astype(np.int32)
    extra = (on, pitch, np.array([3, 2, 0], np.int32))
  run = decode.jitted(model, stage, MAX_LEN)
  first = lambda out: out[0] if stage in decode.FREE_STAGES else out  # noqa: E731  free stages: (tokens, probs)
  cached = np.asarray(first(run(params, features, *extra)))
  np.testing.assert_array_equal(cached, np.asarray(first(run(cast, features, *extra))))  # the loop casts float32 itself
  if stage == "velocity":
    assert np.all((cached[0, :3] >= vocab.velocity_id(1)) & (cached[0, :3] <= vocab.velocity_id(127)))
    assert np.all(cached[1, 2:] == vocab.PAD) and np.all(cached[2] == vocab.PAD)
  else:
    for row in cached:
      _check_grammar(stage, row)


def _allowed(stage, tokens, carriable=None):
  """The grammar's allowed ids after writing `tokens` (one row); `carriable`: MIDI pitches, or None (all)."""
  if carriable is not None:
    carriable = np.isin(np.arange(vocab.NUM_PITCHES), carriable)[None]
  state = decode.GrammarState.start(1, carriable)
  for t in tokens:
    state = decode.advance(stage, state, jnp.asarray([t], jnp.int32))
  return np.asarray(decode.allowed_tokens(stage, state)[0])


def test_grammar_onset_slot():
  t, p = vocab.time_id, vocab.pitch_id
  allowed = _allowed("onset_pitch", [t(250), p(60)])
  assert allowed[vocab.EOS] and allowed[t(250)] and allowed[t(999)]
  assert not allowed[t(249)] and not allowed[t(1000)]  # backwards in time; 1000 belongs to the next segment
  assert not allowed[p(61)] and not allowed[vocab.NOTE_SUSTAIN] and not allowed[vocab.velocity_id(50)]
  assert _allowed("flatten", [])[vocab.NOTE_SUSTAIN]  # carried notes come first...
  assert not _allowed("flatten", [t(3), p(60), t(9), vocab.velocity_id(9)])[vocab.NOTE_SUSTAIN]  # ...only first


def test_grammar_pitch_slot_rises_within_one_onset():
  t, p = vocab.time_id, vocab.pitch_id
  allowed = _allowed("onset_pitch", [t(250), p(60), t(250)])
  assert allowed[p(61)] and not allowed[p(60)] and not allowed[p(59)]
  assert not allowed[vocab.EOS] and not allowed[t(300)]  # no <eos> inside a note
  top = _allowed("onset_pitch", [t(250), p(108)])
  assert not top[t(250)] and top[t(251)]  # no pitch is left above the top key at onset 250
  later = _allowed("onset_pitch", [t(250), p(60), t(251)])
  assert later[p(21)] and later[p(108)] and not later[p(20)] and not later[p(109)]
  carried = _allowed("flatten", [vocab.NOTE_SUSTAIN, p(64), vocab.NOTE_SUSTAIN, vocab.velocity_id(9),
                                 vocab.NOTE_SUSTAIN])
  assert carried[p(65)] and not carried[p(64)]  # carried notes by rising pitch, one per pitch


def test_grammar_carries_only_carriable_pitches():
  p, s = vocab.pitch_id, vocab.NOTE_SUSTAIN
  assert not _allowed("flatten", [], carriable=[])[s]  # a piece's first segment
  start = _allowed("flatten", [], carriable=[60, 64])
  assert start[s] and start[vocab.time_id(0)]
  first = _allowed("flatten", [s], carriable=[60, 64])
  assert np.flatnonzero(first).tolist() == [p(60), p(64)]
  after_60 = [s, p(60), vocab.time_id(40), vocab.velocity_id(9)]
  assert _allowed("flatten", after_60, carriable=[60, 64])[s]
  assert np.flatnonzero(_allowed("flatten", after_60 + [s], carriable=[60, 64])).tolist() == [p(64)]
  after_64 = [s, p(64), vocab.time_id(40), vocab.velocity_id(9)]
  assert not _allowed("flatten", after_64, carriable=[60, 64])[s]  # nothing above 64 is left
  assert not _allowed("flatten", [], carriable=[10, 120])[s]  # off the keyboard


def test_grammar_offset_and_velocity_slots():
  t, p, v = vocab.time_id, vocab.pitch_id, vocab.velocity_id
  off = _allowed("flatten", [t(250), p(60)])
  assert off[t(251)] and off[t(1000)] and off[vocab.NOTE_SUSTAIN]
  assert not off[t(250)] and not off[vocab.EOS] and not off[v(3)]
  carried = _allowed("offset", [vocab.NOTE_SUSTAIN, p(60)])
  assert carried[t(1)] and not carried[t(0)]
  vel = _allowed("flatten", [t(250), p(60), t(300)])
  assert vel[v(1)] and vel[v(127)] and not vel[v(0)] and not vel[t(300)]
