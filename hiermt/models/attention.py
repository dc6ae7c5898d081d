"""Full-sequence (training) attention for the decoder.

`jax.nn.dot_product_attention`'s XLA form builds the whole `[batch, heads,
queries, keys]` score tensor; for causal attention half of it is masked-out
work. XLA's GPU and TPU compilers fuse the softmax around the two matmuls, and
there `attend` uses it as it is (its cuDNN flash-attention form is not selected
automatically and has not been tried on a GPU here). XLA:CPU fuses little, so
on CPU `attend` splits the queries into chunks and gives each chunk only the
keys it may see, which skips the upper triangle's matmuls and softmax passes
and keeps only the visible part of the probabilities for the backward pass.
"""

import jax
import jax.numpy as jnp

# Query rows per chunk on CPU: 1024 causal tokens in 4 chunks skip 3/8 of the
# score work while each einsum stays large enough to run near matmul speed.
QUERY_CHUNK = 256


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
