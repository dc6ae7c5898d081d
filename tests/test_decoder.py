"""Tests for the LLaMA-style decoder: KV cache, causality, RoPE, sizes, dtypes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from hiermt import vocabulary
from hiermt.models import attention
from hiermt.models import decoder as dec

VOCAB = vocabulary.VOCAB_SIZE
BATCH, FRAMES, D_ENC, MAX_LEN = 2, 7, 12, 12


def _model(conditioning="prefix", **kw):
  kw = {"num_layers": 2, "num_heads": 4, "dim": 32, "prefix_pool": 2, **kw}
  return dec.Decoder(vocab_size=VOCAB, max_len=MAX_LEN, conditioning=conditioning, **kw)


def _inputs(seed=0, frames=FRAMES):
  k1, k2 = jax.random.split(jax.random.key(seed))
  tokens = jax.random.randint(k1, (BATCH, MAX_LEN), 0, VOCAB)
  audio = jax.random.normal(k2, (BATCH, frames, D_ENC))
  return tokens, audio


@functools.cache
def _setup(conditioning):
  """(model, params, jitted forward, jitted decode step), shared by tests: compiling dominates their run time."""
  model = _model(conditioning)
  params = jax.jit(model.init)(jax.random.key(1), *_inputs())["params"]
  forward = jax.jit(lambda p, t, a: model.apply({"params": p}, t, a))
  step = jax.jit(lambda p, cache, t, a: model.apply({"params": p, "cache": cache}, t, a, decode=True,
                                                   mutable=["cache"]))
  return model, params, forward, step


def _decode_in_chunks(conditioning, tokens, audio, chunks):
  """`_decode_with_cache` with the shared model of `conditioning` (`_setup`)."""
  model, params, _, step = _setup(conditioning)
  return _decode_with_cache(model, params, step, tokens, audio, chunks)


def _cached_vs_full(model, tokens, audio, chunks=(2, 1, 1, 4, 4)):
  """(logits decoded through the KV cache in `chunks`, logits of the full forward) of a fresh `model`."""
  params = jax.jit(model.init)(jax.random.key(1), tokens, audio)["params"]
  step = jax.jit(lambda p, cache, t, a: model.apply({"params": p, "cache": cache}, t, a, decode=True,
                                                   mutable=["cache"]))
  full = jax.jit(model.apply)({"params": params}, tokens, audio)
  return _decode_with_cache(model, params, step, tokens, audio, chunks), full


def _decode_with_cache(model, params, step, tokens, audio, chunks):
  """Feeds `tokens` through the KV cache in pieces of the given sizes; returns the concatenated logits."""
  cache = model.init_cache(audio)
  out, start = [], 0
  for i, size in enumerate(chunks):
    logits, mutated = step(params, cache, tokens[:, start:start + size], audio if i == 0 else None)
    cache = mutated["cache"]
    out.append(logits)
    start += size
  assert start == tokens.shape[1]
  return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize("conditioning", ["prefix", "cross"])
@pytest.mark.parametrize("chunks", [[1] * MAX_LEN, [2, 1, 1, 4, 4]], ids=["steps", "chunks"])
def test_cached_decoding_matches_full_forward(conditioning, chunks):
  _, params, forward, _ = _setup(conditioning)
  tokens, audio = _inputs()
  cached = _decode_in_chunks(conditioning, tokens, audio, chunks)
  np.testing.assert_allclose(cached, forward(params, tokens, audio), rtol=1e-5, atol=1e-5)


def test_cached_decoding_matches_full_forward_across_cache_chunks():
  # A prefix of 2 * KEY_CHUNK - 5 frames puts the tokens at slots around the end of the second chunk, so
  # later calls read three chunks and one multi-token call straddles a chunk boundary.
  model = _model("prefix", prefix_pool=1)
  tokens, audio = _inputs(frames=2 * attention.KEY_CHUNK - 5)
  assert model.init_cache(audio)["block_0"]["self_attn"]["cached_key"].shape[-1] == 3 * attention.KEY_CHUNK
  cached, full = _cached_vs_full(model, tokens, audio)
  np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("queries", [1, 3])
def test_attend_cache_reads_only_written_slots(queries):
  batch, slots, heads, head_dim = 2, 32, 3, 8
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (batch, queries, heads, head_dim))
  k = jax.random.normal(kk, (batch, slots, heads, head_dim))
  v = jax.random.normal(kv, (batch, slots, heads, head_dim))
  # Without positions every query sees every slot (cross-attention).
  np.testing.assert_allclose(attention.attend_cache(q, attention.key_cache(k), attention.value_cache(v)),
                             jax.nn.dot_product_attention(q, k, v), atol=1e-5)
  positions = jnp.arange(14 - queries, 14)  # the last query at slot 13, in the second of four 8-slot chunks
  visible = jnp.arange(slots)[None, :] <= positions[:, None]  # [queries, slots]
  want = jax.nn.dot_product_attention(q, k, v, mask=visible[None, None])
  # Unwritten slots: masked in the chunk being filled, never read after it (NaN would show).
  slot = jnp.arange(slots)[None, :, None, None]
  k, v = (jnp.where(slot >= 16, jnp.nan, jnp.where(slot > 13, 1e4, x)) for x in (k, v))
  got = attention.attend_cache(q, attention.key_cache(k), attention.value_cache(v), positions, key_chunk=8)
  np.testing.assert_allclose(got, want, atol=1e-5)
  with pytest.raises(ValueError, match="whole number"):
    attention.attend_cache(q, attention.key_cache(k), attention.value_cache(v), positions, key_chunk=12)


@pytest.mark.parametrize("conditioning", ["prefix", "cross"])
def test_changing_a_token_never_changes_earlier_logits(conditioning):
  _, params, forward, _ = _setup(conditioning)
  tokens, audio = _inputs()
  t = 5
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % VOCAB)
  a, b = forward(params, tokens, audio), forward(params, changed, audio)
  np.testing.assert_array_equal(a[:, :t], b[:, :t])
  assert not np.allclose(a[:, t], b[:, t]) and not np.allclose(a[:, -1], b[:, -1])


def test_rope_scores_depend_only_on_position_difference():
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 16))
  def score(pq, pk):
    rq = dec.apply_rope(q, jnp.array([pq]))
    rk = dec.apply_rope(k, jnp.array([pk]))
    return float(jnp.sum(rq * rk))
  assert score(3, 1) == pytest.approx(score(10, 8), rel=1e-5)
  assert score(0, 0) == pytest.approx(score(57, 57), rel=1e-5)
  assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)
  # Adjacent features form the rotated pairs: rotating only touches (x0, x1) for a one-pair input.
  x = jnp.zeros((1, 1, 1, 4)).at[..., 0].set(1.0)
  np.testing.assert_allclose(dec.apply_rope(x, jnp.array([1]))[0, 0, 0], [np.cos(1), np.sin(1), 0, 0], atol=1e-6)


def test_partial_rope_rotates_only_the_first_features():
  # One group of 2 of 4 features: only (x0, x1) turn, by position * 1e4**0 = 1 rad per position; x2, x3 pass.
  x = jnp.array([1.0, 0.0, 0.5, -2.0]).reshape(1, 1, 1, 4)
  np.testing.assert_allclose(dec.rotate(x, (jnp.array([2]),), (2,))[0, 0, 0],
                             [np.cos(2), np.sin(2), 0.5, -2.0], atol=1e-6)
  # A group uses its own width for the frequencies: pair 1 of a 4-feature group turns by 1e4**(-1/2).
  y = jnp.zeros((1, 1, 1, 6)).at[..., 2].set(1.0)
  np.testing.assert_allclose(dec.rotate(y, (jnp.array([3]),), (4,))[0, 0, 0],
                             [0, 0, np.cos(0.03), np.sin(0.03), 0, 0], atol=1e-6)
  # Two groups of 2 (time, then sequence positions) with their own positions: (x0, x1) by 5 rad,
  # (x2, x3) by 7 rad (each group's first pair has frequency 1), x4, x5 pass.
  z = jnp.array([1.0, 0.0, 0.0, 1.0, 3.0, 4.0]).reshape(1, 1, 1, 6)
  np.testing.assert_allclose(dec.rotate(z, (jnp.array([[5.0]]), jnp.array([7])), (2, 2))[0, 0, 0],
                             [np.cos(5), np.sin(5), -np.sin(7), np.cos(7), 3.0, 4.0], atol=1e-6)
  assert [dec.rotary_dims(32, f) for f in (1.0, 0.5, 0.25, 0.0)] == [32, 16, 8, 0]
  assert dec.rotary_dims(8, 0.3) == 2  # 2.4 features -> one pair
  with pytest.raises(ValueError, match="rope_fraction"):
    dec.rotary_dims(32, 1.5)


def test_cached_decoding_matches_full_forward_with_partial_rope():
  model = _model("prefix", rope_fraction=0.5)
  tokens, audio = _inputs()
  cached, full = _cached_vs_full(model, tokens, audio)
  np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5)
  # Half the features rotate: the same parameters give other logits in the fully rotary model.
  params = model.init(jax.random.key(1), tokens, audio)["params"]
  assert not np.allclose(full, _model("prefix").apply({"params": params}, tokens, audio), atol=1e-4)


def test_audio_conditions_the_logits_and_prefix_positions_get_none():
  _, params, forward, _ = _setup("prefix")
  tokens, audio = _inputs()
  logits = forward(params, tokens, audio)
  assert logits.shape == (BATCH, MAX_LEN, VOCAB) and logits.dtype == jnp.float32
  # A longer prefix still yields exactly one row per token, and the rows follow the audio.
  longer = forward(params, tokens, jnp.concatenate([audio, audio], axis=1))
  assert longer.shape == logits.shape
  assert not np.allclose(longer[:, 0], logits[:, 0])


def test_prefix_pool_averages_frames_including_a_short_last_window():
  _, params, pooled_forward, _ = _setup("prefix")  # prefix_pool=2
  tokens, audio = _inputs(frames=5)
  manual = jnp.stack([audio[:, 0:2].mean(1), audio[:, 2:4].mean(1), audio[:, 4:5].mean(1)], axis=1)
  unpooled = jax.jit(_model(prefix_pool=1).apply)({"params": params}, tokens, manual)
  np.testing.assert_allclose(pooled_forward(params, tokens, audio), unpooled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size,target", [("tiny", 14.93e6), ("small", 44.42e6), ("base", 79.67e6),
                                         ("large", 156.76e6)])
def test_parameter_counts_match_the_paper_sizes(size, target):
  layers, heads, dim, _ = base.DECODER_SIZES[size]
  model = dec.Decoder(VOCAB, layers, heads, dim, max_len=1024)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  audio = jax.ShapeDtypeStruct((1, 10, 1536), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens, audio)["params"]
  # The paper quotes millions to two decimals.
  assert abs(dec.count_params(params) - target) <= 0.005e6
  assert dec.count_params(params, exclude=()) == dec.count_params(params) + 1536 * dim + dim


def test_swiglu_width_rounds_up_to_256():
  assert [dec.swiglu_hidden(d) for d in (512, 768, 1024, 64)] == [1536, 2048, 2816, 256]


def test_time_tokens_start_at_their_frames_position_codes():
  # dim 8: inverse frequencies 1e4^(-k/4) = 1, 0.1, 0.01, 0.001. Tokens 8..10 name prefix
  # positions 0, 0.5 and 1 (0.5 per token).
  model = _model(dim=8, num_heads=2, time_tokens=(8, 3, 0.5), time_init=True)
  params = model.init(jax.random.key(1), *_inputs())["params"]
  plain = _model(dim=8, num_heads=2).init(jax.random.key(1), *_inputs())["params"]
  inv = np.array([1.0, 0.1, 0.01, 0.001])
  want = 0.1 * np.array([np.concatenate([np.sin(p * inv), np.cos(p * inv)]) for p in (0.0, 0.5, 1.0)])
  np.testing.assert_allclose(want[0], 0.1 * np.array([0, 0, 0, 0, 1, 1, 1, 1]))
  embedding, head = np.asarray(params["embed"]["embedding"]), np.asarray(params["head"]["kernel"])
  np.testing.assert_allclose(embedding[8:11], want, atol=1e-7)
  np.testing.assert_allclose(head[:, 8:11], want.T, atol=1e-7)
  # Every other row and column: the default initialisation, from the same key.
  keep = np.r_[0:8, 11:VOCAB]
  np.testing.assert_array_equal(embedding[keep], np.asarray(plain["embed"]["embedding"])[keep])
  np.testing.assert_array_equal(head[:, keep], np.asarray(plain["head"]["kernel"])[:, keep])
  with pytest.raises(ValueError, match="conditioning='prefix'"):
    _model("cross", time_tokens=(8, 3, 0.5), time_init=True).init(jax.random.key(1), *_inputs())
  # The layout alone changes nothing.
  same = _model(dim=8, num_heads=2, time_tokens=(8, 3, 0.5)).init(jax.random.key(1), *_inputs())["params"]
  np.testing.assert_array_equal(same["embed"]["embedding"], plain["embed"]["embedding"])


def test_token_times_carry_the_latest_time_token():
  # Time ids 8, 9, 10 name times 0, 1, 2. Row 0 starts a sequence (time 0), row 1 continues
  # one that had reached time 5.
  tokens = jnp.array([[1, 9, 2, 3, 10, 8, 4],
                      [2, 3, 10, 1, 11, 7, 9]])
  times = dec.token_times(tokens, 8, 3, jnp.array([0, 5]))
  np.testing.assert_array_equal(times, [[0, 1, 1, 1, 2, 0, 0],
                                        [5, 5, 2, 2, 2, 2, 1]])
  # With a 3-frame prefix at 0.5 frames per token, frames sit at times 0, 2, 4.
  positions = dec.time_positions(times, 3, 0.5)
  np.testing.assert_array_equal(positions[1], [0, 2, 4, 5, 5, 2, 2, 2, 2, 1])
  assert positions.shape == (2, 10) and positions.dtype == jnp.float32


def _time_rope_model(share=1.0, **kw):
  # Ids 8..607 are times: about half of `_inputs`' random tokens. Heads of 16 features, 8 rotated:
  # share 0.5 turns 4 by times and 4 by sequence indices.
  return _model(time_tokens=(8, 600, 0.5), rope_time=share, rope_fraction=0.5, **kw)


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_cached_decoding_matches_full_forward_with_time_rope(share):
  # Chunks of 1, 2 and 4 tokens carry the time reached across decode calls.
  tokens, audio = _inputs()
  cached, full = _cached_vs_full(_time_rope_model(share), tokens, audio, chunks=(1, 2, 1, 4, 4))
  np.testing.assert_allclose(cached, full, atol=1e-4)
  # The same parameters with sequence positions give other logits.
  params = _time_rope_model(share).init(jax.random.key(1), tokens, audio)["params"]
  other = _model(time_tokens=(8, 600, 0.5), rope_fraction=0.5).apply({"params": params}, tokens, audio)
  assert np.abs(np.asarray(other) - np.asarray(full)).max() > 1e-3


def test_time_rope_positions_are_the_times_reached():
  # One prefix frame (2 frames pooled 2x) sits at position 0 in both schemes. Tokens naming
  # times 0, 1, 2, ... in turn put token j at time j, its sequence index: the logits equal the
  # sequence-position model's. Times 0, 2, 4, ... move every token but the first.
  audio = _inputs(frames=2)[1]
  steps = 8 + jnp.tile(jnp.arange(MAX_LEN), (BATCH, 1))  # [batch, MAX_LEN]
  strides = 8 + 2 * jnp.tile(jnp.arange(MAX_LEN), (BATCH, 1))
  model, plain = _time_rope_model(), _model(time_tokens=(8, 600, 0.5), rope_fraction=0.5)
  params = model.init(jax.random.key(1), steps, audio)["params"]
  np.testing.assert_allclose(model.apply({"params": params}, steps, audio),
                             plain.apply({"params": params}, steps, audio), atol=1e-5)
  moved = np.abs(np.asarray(model.apply({"params": params}, strides, audio))
                 - np.asarray(plain.apply({"params": params}, strides, audio))).max(axis=-1)  # [batch, MAX_LEN]
  assert moved[:, 0].max() < 1e-5 and moved[:, 1:].min() > 1e-4


def test_bfloat16_compute_keeps_float32_params():
  _, params, forward, _ = _setup("prefix")
  model = _model(dtype=jnp.bfloat16, remat=True)
  tokens, audio = _inputs()
  abstract = jax.eval_shape(model.init, jax.random.key(0), tokens, audio)["params"]
  assert {x.dtype for x in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}

  def loss(p):
    logits = model.apply({"params": p}, tokens, audio)
    return logits.mean(), logits

  assert "bf16" in str(jax.make_jaxpr(loss)(params))
  grads, logits = jax.jit(jax.grad(loss, has_aux=True))(params)
  assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, forward(params, tokens, audio), atol=0.1)


def test_bad_input_raises_clear_errors():
  tokens, audio = _inputs()
  with pytest.raises(ValueError, match="conditioning"):
    _model("concat").init(jax.random.key(0), tokens, audio)
  with pytest.raises(ValueError, match="audio features are required"):
    _model().init(jax.random.key(0), tokens)
  with pytest.raises(ValueError, match="max_len"):
    _model().init(jax.random.key(0), jnp.zeros((1, MAX_LEN + 1), jnp.int32), audio)
  with pytest.raises(ValueError, match="rope_time needs Decoder.time_tokens"):
    _model(rope_time=1.0).init(jax.random.key(0), tokens, audio)
  with pytest.raises(ValueError, match="rope_time must be a share"):
    _model(time_tokens=(8, 3, 0.5), rope_time=1.5).init(jax.random.key(0), tokens, audio)
  with pytest.raises(ValueError, match="rope_time aligns"):
    _model("cross", time_tokens=(8, 3, 0.5), rope_time=0.5).init(jax.random.key(0), tokens, audio)
