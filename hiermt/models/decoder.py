"""LLaMA-style note-token decoder conditioned on roll-encoder features.

Pre-norm blocks with RMSNorm (eps 1e-5), SwiGLU MLPs, rotary position
embeddings on adjacent feature pairs (base 1e4), no biases, an untied output
head and a final RMSNorm. Audio features `[batch, frames, d_enc]` condition the
decoder in one of two ways (`conditioning`):

* `"prefix"` (default, the paper's decoder-only model): the features go
  through `Dense(dim)` plus a fixed sinusoidal absolute position encoding and
  are prepended to the token embeddings. Attention is causal over the whole
  `[prefix; tokens]` sequence, as in the official prefix variant, so training
  needs no special mask and each prefix frame sees only earlier frames. RoPE
  rotates note tokens only: token t sits at rotary position t and every prefix
  frame at rotary position 0 (an identity rotation); the prefix order is carried
  by the sinusoidal encoding. Logits and the loss cover token positions only.
  `rope_time` gives a share of the rotated features times instead: there a
  prefix frame's rotary position is its start and a token's the time its
  sequence has reached.
* `"cross"` (the official code): self-attention, SwiGLU, cross-attention to the
  projected audio (RoPE on queries only, no mask), a second SwiGLU. The audio is
  `Dense(dim)(features) + Dense(dim)(64-d sinusoidal positions)`.

All audio-side parameters live in the `audio_proj` subtree, so parameter counts
can leave them out. `note_reader` (off by default) adds logits read from a
per-key encoder's rolls (`note_reader.py`), in the `note_reader` subtree.

Incremental decoding uses the flax `cache` collection: `init_cache` builds it
(fixed shapes, so the loop fits `lax.while_loop`); the first `decode=True` call
passes the audio and one or more tokens (prefill: a call with audio starts the
sequence afresh), later calls pass any number of next tokens without audio.
Every row of the batch advances in lockstep. Later calls attend to the cache
through `attention.attend_cache`, reading only its written slots.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hiermt.models import attention
from hiermt.models import note_reader as note_reader_lib

CONDITIONINGS = ("prefix", "cross")
ROPE_BASE = 1e4
RMS_EPS = 1e-5
# The official cross-attention decoder encodes audio positions with 64 sinusoids.
CROSS_POSITION_DIM = 64
# `Decoder.time_tokens`: the position codes' scale in the embedding and head (unit sines and
# cosines: a code's norm is sqrt(dim / 2)); 0.1 measured on the CPU recipe (docs/design.md).
TIME_CODE_SCALE = 0.1


def swiglu_hidden(dim: int) -> int:
  """LLaMA's MLP width: int(8 * dim / 3) rounded up to a multiple of 256."""
  return -(-int(8 * dim / 3) // 256) * 256


def sinusoidal_positions(length: int, dim: int) -> jax.Array:
  """Fixed absolute position encoding, sines in the first half of the features.

  Args:
    length: number of positions.
    dim: encoding size (even).

  Returns:
    float32 `[length, dim]`.
  """
  return sinusoids(jnp.arange(length, dtype=jnp.float32), dim)


def sinusoids(positions: jax.Array, dim: int) -> jax.Array:
  """`sinusoidal_positions` at any (fractional) positions `[n]` -> float32 `[n, dim]`."""
  half = dim // 2
  inv_freq = ROPE_BASE ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [half]
  angles = positions.astype(jnp.float32)[:, None] * inv_freq  # [n, half]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def time_aligned_init(base, rows: range, codes: jax.Array, axis: int):
  """Initialiser: `base`, then `codes` `[len(rows), dim]` written into rows (axis 0, an embedding
  table) or columns (axis 1, an output kernel) `rows` of the parameter."""
  def init(key, shape, dtype=jnp.float32):
    x = base(key, shape, dtype)
    index = (slice(rows.start, rows.stop),) if axis == 0 else (slice(None), slice(rows.start, rows.stop))
    return x.at[index].set((codes if axis == 0 else codes.T).astype(dtype))
  return init


def token_times(tokens: jax.Array, first: int, count: int, start: jax.Array) -> jax.Array:
  """The time each token's sequence has reached: the value of the latest time token at or
  before it (ids first..first+count-1 name times 0..count-1), `start` before the first one.

  Args:
    tokens: int `[batch, n]`.
    start: int `[batch]`, the time reached before `tokens` (0 for a fresh sequence).

  Returns:
    int32 `[batch, n]`.
  """
  is_time = (tokens >= first) & (tokens < first + count)  # [batch, n]
  index = jnp.where(is_time, jnp.arange(tokens.shape[1]), -1)  # [batch, n]
  latest = jax.lax.cummax(index, axis=1)  # [batch, n]: position of the latest time token, -1 if none
  values = jnp.take_along_axis(tokens - first, jnp.maximum(latest, 0), axis=1)  # [batch, n]
  return jnp.where(latest >= 0, values, start[:, None]).astype(jnp.int32)


def time_positions(times: jax.Array, num_prefix: int, frames_per_token: float) -> jax.Array:
  """`Decoder.rope_time`'s rotary positions of `[prefix; tokens]`, in time-token steps.

  Prefix frame f sits at its start, f / (prefix frames per token); each token at
  its `token_times` value.

  Args:
    times: int `[batch, n]`, `token_times` of the tokens.
    num_prefix: prefix frames before the tokens (0 on decode calls after the prefill).
    frames_per_token: prefix frames per time token (`Decoder.time_tokens[2]`).

  Returns:
    float32 `[batch, num_prefix + n]`.
  """
  frames = jnp.arange(num_prefix, dtype=jnp.float32) / frames_per_token  # [num_prefix]
  return jnp.concatenate([jnp.broadcast_to(frames, (times.shape[0], num_prefix)), times.astype(jnp.float32)],
                         axis=1)


def apply_rope(x: jax.Array, positions: jax.Array) -> jax.Array:
  """Rotates adjacent feature pairs (x[2i], x[2i+1]) by position * ROPE_BASE**(-2i/d), d = x's last axis.

  Args:
    x: `[batch, length, heads, d]`, d even.
    positions: rotary positions, `[length]` (shared by the batch) or `[batch, length]`.

  Returns:
    The rotated array, same shape and dtype as `x`.
  """
  head_dim = x.shape[-1]
  inv_freq = ROPE_BASE ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # [head_dim/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [(batch,) length, head_dim/2]
  cos = jnp.cos(angles)[..., None, :]  # [(batch,) length, 1, head_dim/2]
  sin = jnp.sin(angles)[..., None, :]
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], head_dim // 2, 2)
  even, odd = pairs[..., 0], pairs[..., 1]  # [batch, length, heads, head_dim/2]
  rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
  return rotated.reshape(x.shape).astype(x.dtype)


def rotary_dims(head_dim: int, fraction: float) -> int:
  """The features per head that RoPE rotates: `fraction` of head_dim, rounded to an even number."""
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"Decoder.rope_fraction must be in [0, 1], got {fraction}")
  return 2 * int(round(head_dim * fraction / 2))


def rotate(x: jax.Array, rotations: tuple, dims: tuple) -> jax.Array:
  """RoPE in groups: feature group g (`dims[g]` features, in order) turns by `rotations[g]`'s
  positions (`apply_rope`, each group its own set of frequencies); features after the
  groups pass through, as in GPT-NeoX's partial rotary.

  Args:
    x: `[batch, length, heads, head_dim]`.
    rotations: one array of rotary positions per group, each `[length]` or `[batch, length]`.
    dims: even feature counts per group, summing to at most head_dim.
  """
  parts, start = [], 0
  for positions, width in zip(rotations, dims, strict=True):
    parts.append(apply_rope(x[..., start:start + width], positions))
    start += width
  return jnp.concatenate(parts + [x[..., start:]], axis=-1)


def _pool_time(x: jax.Array, factor: int) -> jax.Array:
  """Averages non-overlapping windows of `factor` frames; a short last window keeps its own mean."""
  if factor == 1:
    return x
  batch, frames, dim = x.shape
  windows = -(-frames // factor)
  padded = jnp.pad(x, ((0, 0), (0, windows * factor - frames), (0, 0)))
  sums = padded.reshape(batch, windows, factor, dim).sum(axis=2)  # [batch, windows, dim]
  counts = jnp.minimum(factor, frames - factor * jnp.arange(windows))  # [windows]
  return sums / counts[:, None].astype(x.dtype)


def rowwise(layer, x: jax.Array, feature_axes: int = 1) -> jax.Array:
  """`layer(x)` with x's leading axes merged into one row axis, split again afterwards.

  A dense layer on `[batch, length, dim]` becomes one 2-D matmul, which
  XLA:CPU runs ~15 % faster than the 3-D dot_general (measured on the tiny
  decoder's training step); elsewhere the reshapes are free.
  """
  lead = x.shape[:-feature_axes]
  y = layer(x.reshape(-1, *x.shape[len(lead):]))
  return y.reshape(*lead, *y.shape[1:])


class AudioProjection(nn.Module):
  """Maps encoder features `[batch, frames, d_enc]` to decoder inputs `[batch, frames/pool, dim]`."""
  dim: int
  conditioning: str
  pool: int
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, features):
    dense = functools.partial(nn.Dense, self.dim, dtype=self.dtype, param_dtype=self.param_dtype)
    pooled = _pool_time(features, self.pool)  # [batch, frames', d_enc]
    x = rowwise(dense(name="features"), pooled)  # [batch, frames', dim]
    frames = x.shape[1]
    if self.conditioning == "prefix":
      positions = sinusoidal_positions(frames, self.dim).astype(self.dtype)
    else:
      positions = dense(name="positions")(sinusoidal_positions(frames, CROSS_POSITION_DIM))
    return x + positions[None]


class SwiGLU(nn.Module):
  """Gated MLP: down(silu(gate(x)) * up(x))."""
  hidden: int
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    gated = nn.silu(rowwise(dense(self.hidden, name="gate"), x)) * rowwise(dense(self.hidden, name="up"), x)
    return rowwise(dense(x.shape[-1], name="down"), gated)


class Attention(nn.Module):
  """Multi-head attention; self-attention with a KV cache, or cross-attention to audio.

  Self-attention (`cross=False`) rotates queries and keys and is causal over
  absolute positions. Cross-attention rotates queries only and sees every audio
  frame. In decode mode both keep their keys/values in the `cache` collection
  in the layouts `attention.attend_cache` reads (keys `[batch, heads,
  head_dim, slots]`, values `[batch, heads, slots, head_dim]`): self-attention
  writes the new ones at `positions`, cross-attention stores the audio's on
  prefill and reuses them afterwards. The prefill starts from an empty cache,
  so it attends exactly as the full forward does.
  """
  num_heads: int
  cross: bool
  decode: bool
  prefill: bool
  cache_len: int | None
  dtype: Any
  param_dtype: Any
  rotary_dims: tuple = ()  # features per head in each rotary group (`rotate`)

  @nn.compact
  def __call__(self, x, positions, rotations, memory=None):
    """x `[batch, n, dim]`; positions `[n]`; rotations: each rotary group's positions, `[n]`
    or `[batch, n]`; memory `[batch, frames, dim]` or None."""
    dim = x.shape[-1]
    proj = functools.partial(
        nn.DenseGeneral, features=(self.num_heads, dim // self.num_heads), use_bias=False,
        dtype=self.dtype, param_dtype=self.param_dtype)
    q = rotate(rowwise(proj(name="query"), x), rotations, self.rotary_dims)  # [batch, n, heads, head_dim]
    if self.cross:
      if memory is not None:
        k = rowwise(proj(name="key"), memory)  # [batch, frames, heads, head_dim]
        v = rowwise(proj(name="value"), memory)
    else:
      k = rotate(rowwise(proj(name="key"), x), rotations, self.rotary_dims)  # [batch, n, heads, head_dim]
      v = rowwise(proj(name="value"), x)
    if self.decode:
      if self.cross:
        # Created and filled by the prefill, which carries the audio; only read afterwards.
        cached_k = self.variable("cache", "cached_cross_key", lambda: attention.key_cache(k))
        cached_v = self.variable("cache", "cached_cross_value", lambda: attention.value_cache(v))
        if self.prefill:
          cached_k.value, cached_v.value = attention.key_cache(k), attention.value_cache(v)
      else:
        batch, head_dim = x.shape[0], dim // self.num_heads
        cached_k = self.variable("cache", "cached_key", jnp.zeros,
                                 (batch, self.num_heads, head_dim, self.cache_len), self.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros,
                                 (batch, self.num_heads, self.cache_len, head_dim), self.dtype)
        cached_k.value = jax.lax.dynamic_update_slice(
            cached_k.value, attention.key_cache(k), (0, 0, 0, positions[0]))  # [batch, heads, head_dim, slots]
        cached_v.value = jax.lax.dynamic_update_slice(
            cached_v.value, attention.value_cache(v), (0, 0, positions[0], 0))  # [batch, heads, slots, head_dim]
    if self.decode and not self.prefill:
      out = attention.attend_cache(q, cached_k.value, cached_v.value,
                                   None if self.cross else positions)  # [batch, n, heads, head_dim]
    else:
      # A prefill starts from an empty cache: its tokens see only themselves (or the audio), as in the full forward.
      out = attention.attend(q, k, v, causal=not self.cross)  # [batch, n, heads, head_dim]
    project = nn.DenseGeneral(dim, axis=(-2, -1), use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                              name="out")
    return rowwise(project, out, feature_axes=2)  # [batch, n, dim]


class Block(nn.Module):
  """Pre-norm decoder block; with `cross`, adds cross-attention and a second MLP."""
  num_heads: int
  cross: bool
  decode: bool
  prefill: bool
  cache_len: int | None
  dtype: Any
  param_dtype: Any
  rotary_dims: tuple = ()  # features per head in each rotary group (`rotate`)

  @nn.compact
  def __call__(self, x, positions, rotations, memory):
    """x `[batch, n, dim]` -> `[batch, n, dim]`."""
    norm = functools.partial(nn.RMSNorm, epsilon=RMS_EPS, dtype=self.dtype, param_dtype=self.param_dtype)
    attention_layer = functools.partial(
        Attention, self.num_heads, decode=self.decode, prefill=self.prefill, cache_len=self.cache_len,
        dtype=self.dtype, param_dtype=self.param_dtype, rotary_dims=self.rotary_dims)
    mlp = functools.partial(SwiGLU, swiglu_hidden(x.shape[-1]), dtype=self.dtype, param_dtype=self.param_dtype)
    x = x + attention_layer(cross=False, name="self_attn")(norm(name="attn_norm")(x), positions, rotations)
    x = x + mlp(name="mlp")(norm(name="mlp_norm")(x))
    if self.cross:
      x = x + attention_layer(cross=True, name="cross_attn")(
          norm(name="cross_norm")(x), positions, rotations, memory)
      x = x + mlp(name="cross_mlp")(norm(name="cross_mlp_norm")(x))
    return x


class Decoder(nn.Module):
  """Note-token language model over encoder features.

  Attributes:
    vocab_size: token ids (input embedding and output head).
    num_layers, num_heads, dim: transformer size (dim / num_heads must be even).
    max_len: most tokens one sequence holds; fixes the KV cache length.
    conditioning: "prefix" or "cross" (module docstring).
    prefix_pool: average-pools the audio features in time by this factor first.
    dtype: compute dtype; parameters are stored in `param_dtype`.
    remat: rematerialise each block in the backward pass (not in decode mode).
    rope_fraction: share of each head's features that RoPE rotates (1: all, the paper's
      decoder). The others carry no position, so a note token's query can match the
      audio prefix (at rotary position 0) by content whatever its own position.
    time_tokens: (first id, count, prefix frames per token) of the time tokens, or None;
      needed by `time_init` and `rope_time`.
    time_init: time token i's embedding row and output-head column start as the
      sinusoidal position code of the prefix frame it names (frame i x frames per
      token), scaled by TIME_CODE_SCALE: naming a time and attending to its frame
      start aligned instead of being learnt from scratch (prefix conditioning).
    rope_time: share (0-1) of the rotated features whose rotary positions are times in
      time-token steps instead of sequence indices (prefix conditioning): prefix frame f
      sits at f / (frames per token), each token at the time its sequence has reached
      (`token_times`). A query then meets the prefix at its offset in time from the notes
      written so far, the relation a rotary head learns directly; tokens of one time
      share a time position, so the rest of the rotated features (sequence indices, the
      prefix at 0) keep the order among tokens. 0: sequence indices only (the paper's).
    note_reader: channels per key of the note reader (`note_reader.NoteReader`: logit routes
      from a per-key encoder's rolls; needs `time_tokens` and `key_tokens`). 0: off (the paper's).
    key_tokens, velocity_tokens: (first id, count) of the 88 keys' pitch tokens and of the
      velocity tokens; needed by `note_reader`.
    sustain_token: id of `note_sustain`; needed by `note_reader`.
    end_prior: the note reader's end prior over the end time after a pitch token
      (`note_reader.NoteReader.end_prior`; offset and flatten). False: off.
    onset_prior: the note reader's onset roll prior over the next pitch, time and `<eos>`
      (`note_reader.NoteReader.onset_prior`; onset_pitch). False: off.
    eos_token: id of `<eos>`; needed by `onset_prior`.
  """
  vocab_size: int
  num_layers: int
  num_heads: int
  dim: int
  max_len: int
  conditioning: str = "prefix"
  prefix_pool: int = 1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: bool = False
  rope_fraction: float = 1.0
  time_tokens: tuple | None = None
  time_init: bool = False
  rope_time: float = 0.0
  note_reader: int = 0
  key_tokens: tuple | None = None
  velocity_tokens: tuple | None = None
  sustain_token: int | None = None
  end_prior: bool = False
  onset_prior: bool = False
  eos_token: int | None = None

  def _check(self):
    if self.conditioning not in CONDITIONINGS:
      raise ValueError(f"Decoder.conditioning must be one of {CONDITIONINGS}, got {self.conditioning!r}")
    if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
      raise ValueError(f"Decoder.dim ({self.dim}) / num_heads ({self.num_heads}) must be an even integer "
                       "(RoPE rotates feature pairs)")
    if self.prefix_pool < 1:
      raise ValueError(f"Decoder.prefix_pool must be >= 1, got {self.prefix_pool}")
    if not 0.0 <= self.rope_time <= 1.0:
      raise ValueError(f"Decoder.rope_time must be a share in [0, 1], got {self.rope_time}")
    for option in ("time_init", "rope_time", "note_reader"):
      if getattr(self, option) and self.time_tokens is None:
        raise ValueError(f"Decoder.{option} needs Decoder.time_tokens (the time tokens' ids and frame rate)")
    if self.note_reader < 0:
      raise ValueError(f"Decoder.note_reader must be >= 0 (channels per key; 0: off), got {self.note_reader}")
    if self.note_reader and None in (self.key_tokens, self.velocity_tokens, self.sustain_token):
      raise ValueError("Decoder.note_reader needs Decoder.key_tokens, velocity_tokens and sustain_token (the "
                       "keys' pitch, the velocities' and note_sustain's token ids)")
    if self.onset_prior and not self.note_reader:  # the reader checks eos_token
      raise ValueError("Decoder.onset_prior is a note reader's prior: it needs Decoder.note_reader > 0")
    for option in ("time_init", "rope_time"):
      if getattr(self, option) and self.conditioning != "prefix":
        raise ValueError(f"Decoder.{option} aligns time tokens with the audio prefix's frames: it needs "
                         f"conditioning='prefix', got {self.conditioning!r}")

  @nn.compact
  def __call__(self, tokens, audio=None, *, decode=False):
    """Token logits given audio features.

    Args:
      tokens: int `[batch, n]`. Without `decode`, the whole sequence (teacher
        forcing, n <= max_len). With `decode`, the next n tokens.
      audio: `[batch, frames, d_enc]` encoder features. Required without
        `decode` and on the first (prefill) decode call, which starts the
        sequence afresh; None on later decode calls.
      decode: read and extend the KV cache (`cache` collection, mutable).

    Returns:
      float32 logits `[batch, n, vocab_size]`, one row per input token.
    """
    self._check()
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    if audio is None and not (decode and self.has_variable("cache", "index")):
      raise ValueError("audio features are required, except on decode calls after the prefill call "
                       "(build the cache with Decoder.init_cache and prefill with the audio)")
    if not decode and tokens.shape[1] > self.max_len:
      raise ValueError(f"{tokens.shape[1]} tokens exceed Decoder.max_len={self.max_len}; "
                       "raise config.data.max_tokens or crop the sequence")
    prefix = self.conditioning == "prefix"
    embed_init, head_init = nn.initializers.normal(0.02), nn.initializers.lecun_normal()
    if self.time_init:
      first, count, frames_per_token = self.time_tokens
      rows = range(first, first + count)
      codes = TIME_CODE_SCALE * sinusoids(jnp.arange(count) * frames_per_token, self.dim)  # [count, dim]
      embed_init = time_aligned_init(embed_init, rows, codes, axis=0)
      head_init = time_aligned_init(head_init, rows, codes, axis=1)
    x = nn.Embed(self.vocab_size, self.dim, embedding_init=embed_init,
                 dtype=self.dtype, param_dtype=self.param_dtype, name="embed")(tokens)  # [batch, n, dim]
    memory, num_prefix = None, 0
    reader, reader_maps = None, None
    if self.note_reader:
      first, count, frames_per_token = self.time_tokens
      reader = note_reader_lib.NoteReader(
          self.note_reader, self.vocab_size, (first, count, frames_per_token * self.prefix_pool), self.key_tokens,
          self.velocity_tokens, self.sustain_token, self.dtype, self.param_dtype, eos_token=self.eos_token,
          end_prior=self.end_prior, onset_prior=self.onset_prior, name="note_reader")
      if audio is not None:
        reader_maps = reader.maps(audio)  # key states [batch, frames, 88, channels], readouts, roll priors' rolls
    if audio is not None:
      memory = AudioProjection(self.dim, self.conditioning, self.prefix_pool, self.dtype, self.param_dtype,
                               name="audio_proj")(audio)  # [batch, frames', dim]
      if prefix:
        num_prefix = memory.shape[1]
        x = jnp.concatenate([memory, x], axis=1)  # [batch, frames' + n, dim]
        memory = None
    length = x.shape[1]

    prefill = decode and audio is not None
    if decode:
      index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      prefix_len = self.variable("cache", "prefix_len", lambda: jnp.zeros((), jnp.int32))
      if prefill:
        prefix_len.value = jnp.asarray(num_prefix, jnp.int32)
      start = jnp.zeros((), jnp.int32) if prefill else index.value
      positions = start + jnp.arange(length)  # [length] cache slots
      index.value = start + length
      prefix_slots = prefix_len.value
    else:
      positions = jnp.arange(length)
      prefix_slots = num_prefix
    rotary = rotary_dims(self.dim // self.num_heads, self.rope_fraction)
    time_dims = rotary_dims(rotary, self.rope_time)  # the same even rounding, of the rotated features

    def reached(name, tokens):  # token_times of `tokens`, continued across decode calls in cache `name`
      time_start = jnp.zeros(tokens.shape[:1], jnp.int32)  # [batch]
      if decode:
        last = self.variable("cache", name, jnp.zeros, tokens.shape[:1], jnp.int32)
        time_start = time_start if prefill else last.value
      times = token_times(tokens, *self.time_tokens[:2], time_start)  # [batch, n]
      if decode:
        last.value = times[:, -1]
      return times

    times = reached("time_reached", tokens) if time_dims else None
    if reader is not None:
      # The reader reads each note from its onset, and `note_sustain` counts as time 0: as an onset it
      # marks a note carried in from an earlier segment, which sounds from the segment's start and not from
      # the previous note's end, the time the sequence has reached (as an end, the next onset follows).
      carried_at_0 = jnp.where(tokens == self.sustain_token, self.time_tokens[0], tokens)  # [batch, n]
      note_times = reached("note_time_reached", carried_at_0)  # [batch, n]
      written_start = jnp.full((tokens.shape[0], note_reader_lib.NUM_KEYS), -1, jnp.int32)  # [batch, 88]
      if decode:
        # The prefill computes the key states and their readouts from the audio; later calls read them back.
        cached_maps = self.variable("cache", "note_reader_maps", lambda: reader_maps)
        keys_written = self.variable("cache", "keys_written", lambda: written_start)
        if prefill:
          cached_maps.value = reader_maps
        else:
          written_start = keys_written.value
        reader_maps = cached_maps.value
      written = note_reader_lib.written_times(tokens, note_times, self.key_tokens, written_start)  # [batch, n, 88]
      if decode:
        keys_written.value = written[:, -1]
    # Feature groups: times first, then sequence indices (prefix frames at rotary position 0).
    rotations, dims = [], []
    if time_dims:
      rotations.append(time_positions(times, num_prefix, self.time_tokens[2]))  # [batch, length]
      dims.append(time_dims)
    if rotary > time_dims:
      rotations.append(jnp.maximum(positions - prefix_slots, 0))  # [length]
      dims.append(rotary - time_dims)
    # Only needed when the cache is created, i.e. on the prefill; whole chunks for `attention.attend_cache`.
    cache_len = -(-(num_prefix + self.max_len) // attention.KEY_CHUNK) * attention.KEY_CHUNK if prefill else None

    block = nn.remat(Block) if self.remat and not decode else Block
    for i in range(self.num_layers):
      x = block(self.num_heads, cross=not prefix, decode=decode, prefill=prefill, cache_len=cache_len,
                dtype=self.dtype, param_dtype=self.param_dtype, rotary_dims=tuple(dims),
                name=f"block_{i}")(x, positions, tuple(rotations), memory)
    x = nn.RMSNorm(epsilon=RMS_EPS, dtype=self.dtype, param_dtype=self.param_dtype, name="final_norm")(x)
    x = x[:, num_prefix:]  # [batch, n, dim]: logits for note tokens only
    head = nn.Dense(self.vocab_size, use_bias=False, kernel_init=head_init, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="head")
    logits = rowwise(head, x).astype(jnp.float32)  # [batch, n, vocab]
    if reader is not None:
      logits = logits + reader(reader_maps, tokens, note_times, written)
    return logits

  @nn.nowrap
  def init_cache(self, audio) -> dict:
    """A zero KV cache for decoding a batch of sequences from fresh.

    Args:
      audio: array or `jax.ShapeDtypeStruct` `[batch, frames, d_enc]` with the
        shape of the features the prefill call will pass.

    Returns:
      The `cache` collection for `apply(..., decode=True, mutable=["cache"])`.
    """
    tokens = jax.ShapeDtypeStruct((audio.shape[0], 1), jnp.int32)
    audio = jax.ShapeDtypeStruct(audio.shape, audio.dtype)
    shapes = jax.eval_shape(lambda t, a: self.init(jax.random.key(0), t, a, decode=True)["cache"], tokens, audio)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def count_params(params, exclude=("audio_proj",)) -> int:
  """Number of parameters in a (possibly abstract) tree, skipping top-level subtrees in `exclude`."""
  kept = {k: v for k, v in params.items() if k not in exclude}
  return sum(int(x.size) for x in jax.tree.leaves(kept))
