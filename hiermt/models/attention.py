"""The decoder's attention: whole sequences (`attend`) and new tokens against a KV cache (`attend_cache`).

`jax.nn.dot_product_attention`'s XLA form builds the whole `[batch, heads,
queries, keys]` score tensor; for causal attention half of it is masked-out
work. XLA's GPU and TPU compilers fuse the softmax around the two matmuls, and
there `attend` uses it as it is (its cuDNN flash-attention form is not selected
automatically and has not been tried on a GPU here). XLA:CPU fuses little, so
on CPU `attend` splits the queries into chunks and gives each chunk only the
keys it may see, which skips the upper triangle's matmuls and softmax passes
and keeps only the visible part of the probabilities for the backward pass.

A decoding step has one to a few queries, so its attention is bound by reading
the cache, not by arithmetic. `attend_cache` takes the cache in the layouts its
two matmuls read as they are, keys `[batch, heads, head_dim, slots]` and values
`[batch, heads, slots, head_dim]` (the XLA form of
`jax.nn.dot_product_attention` transposes a `[batch, slots, heads, head_dim]`
cache every call), and reads only the written slots, a chunk of slots at a
time with a running softmax, instead of every slot the cache could hold.
"""

import jax
import jax.numpy as jnp

# Query rows per chunk on CPU: 1024 causal tokens in 4 chunks skip 3/8 of the
# score work while each einsum stays large enough to run near matmul speed.
QUERY_CHUNK = 256
# Cache slots per chunk in `attend_cache`: smaller chunks take more loop
# iterations per step, larger ones copy more unwritten slots (XLA:CPU copies
# every chunk it slices out of the cache before its matmul).
KEY_CHUNK = 128


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool,
                      query_chunk: int = QUERY_CHUNK) -> jax.Array:
  """Softmax attention computed one chunk of queries at a time.

  Args:
    q: `[batch, queries, heads, head_dim]`.
    k, v: `[batch, keys, heads, head_dim]`; with `causal`, keys == queries and
      query i sees keys 0..i.
    causal: mask keys after the query.
    query_chunk: queries per chunk.

  Returns:
    `[batch, queries, heads, head_dim]` in q's dtype. Scores and softmax are
    float32 whatever the input dtype.
  """
  num_queries, num_keys = q.shape[1], k.shape[1]
  if causal and num_queries != num_keys:
    raise ValueError(f"causal attention needs as many keys as queries, got {num_keys} and {num_queries}")
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  outputs = []
  for start in range(0, num_queries, query_chunk):
    stop = min(start + query_chunk, num_queries)
    visible = stop if causal else num_keys  # keys past the chunk's last query are all masked
    scores = jnp.einsum("bqhd,bkhd->bhqk", q[:, start:stop], k[:, :visible],
                        preferred_element_type=jnp.float32)  # [batch, heads, chunk, visible]
    if causal:
      allowed = jnp.arange(start, stop)[:, None] >= jnp.arange(visible)[None, :]  # [chunk, visible]
      scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    outputs.append(jnp.einsum("bhqk,bkhd->bqhd", probs, v[:, :visible]))  # [batch, chunk, heads, head_dim]
  return jnp.concatenate(outputs, axis=1)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool) -> jax.Array:
  """Attention over whole sequences (no KV cache), the fastest form for the default backend.

  Args:
    q: `[batch, queries, heads, head_dim]`.
    k, v: `[batch, keys, heads, head_dim]`.
    causal: query i sees keys 0..i only (keys == queries).

  Returns:
    `[batch, queries, heads, head_dim]`.
  """
  if jax.default_backend() == "cpu":
    return chunked_attention(q, k, v, causal=causal)
  return jax.nn.dot_product_attention(q, k, v, is_causal=causal)


def key_cache(k: jax.Array) -> jax.Array:
  """Keys `[batch, time, heads, head_dim]` in the layout `attend_cache` reads, `[batch, heads, head_dim, time]`."""
  return k.transpose(0, 2, 3, 1)


def value_cache(v: jax.Array) -> jax.Array:
  """Values `[batch, time, heads, head_dim]` in the layout `attend_cache` reads, `[batch, heads, time, head_dim]`."""
  return v.transpose(0, 2, 1, 3)


def attend_cache(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array | None = None, *,
                 key_chunk: int = KEY_CHUNK) -> jax.Array:
  """Attention of a few new queries to the keys and values held in a cache.

  Args:
    q: `[batch, queries, heads, head_dim]`.
    k: `[batch, heads, head_dim, slots]` (`key_cache`).
    v: `[batch, heads, slots, head_dim]` (`value_cache`).
    positions: int `[queries]`, the cache slots of the queries, rising by one
      (`positions[0]`, ..., `positions[-1]`): query j sees slots
      0..positions[j]. Slots after `positions[-1]` are masked out in the chunk
      holding `positions[-1]` (so they must hold finite values, as a
      zero-initialised cache does) and later chunks are not read at all.
      `slots` must then be a multiple of `key_chunk`. None: every query sees
      every slot (cross-attention).
    key_chunk: slots read per chunk when `positions` is given.

  Returns:
    `[batch, queries, heads, head_dim]` in q's dtype. Scores and softmax are
    float32 whatever the input dtype.
  """
  # Heads before queries in every operand and result, keys transposed: XLA:CPU then runs both einsums
  # as plain batched matmuls over the cache. Other layouts make it read the cache transposed, at several
  # times the cost as soon as there is more than one query.
  q = (q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)).transpose(0, 2, 1, 3)  # [batch, heads, queries, head_dim]
  if positions is None:
    scores = jnp.einsum("bhqd,bhdk->bhqk", q, k, preferred_element_type=jnp.float32)  # [batch, heads, queries, slots]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, v).transpose(0, 2, 1, 3)
  batch, heads, head_dim, slots = k.shape
  if slots % key_chunk:
    raise ValueError(f"a cache of {slots} slots is not a whole number of {key_chunk}-slot chunks")

  def chunk(i, carry):
    # Flash-attention's running softmax: rescale what was summed so far whenever the maximum grows.
    top, total, out = carry  # [batch, heads, queries, 1] twice, [batch, heads, queries, head_dim]
    start = i * key_chunk
    k_chunk = jax.lax.dynamic_slice_in_dim(k, start, key_chunk, axis=3)  # [batch, heads, head_dim, key_chunk]
    v_chunk = jax.lax.dynamic_slice_in_dim(v, start, key_chunk, axis=2)  # [batch, heads, key_chunk, head_dim]
    scores = jnp.einsum("bhqd,bhdk->bhqk", q, k_chunk,
                        preferred_element_type=jnp.float32)  # [batch, heads, queries, key_chunk]
    visible = start + jnp.arange(key_chunk)[None, :] <= positions[:, None]  # [queries, key_chunk]
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    new_top = jnp.maximum(top, scores.max(axis=-1, keepdims=True))
    probs = jnp.exp(scores - new_top)
    rescale = jnp.exp(top - new_top)
    out = out * rescale + jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v_chunk,
                                     preferred_element_type=jnp.float32)
    return new_top, total * rescale + probs.sum(axis=-1, keepdims=True), out

  queries = q.shape[2]
  stat = jnp.full((batch, heads, queries, 1), jnp.finfo(jnp.float32).min)
  carry = (stat, jnp.zeros_like(stat), jnp.zeros((batch, heads, queries, head_dim), jnp.float32))
  # Slot 0 is in the first chunk and every query sees it, so the maximum is a real score from then on.
  _, total, out = jax.lax.fori_loop(0, positions[-1] // key_chunk + 1, chunk, carry)
  return (out / total).astype(q.dtype).transpose(0, 2, 1, 3)
