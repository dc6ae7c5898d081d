"""The CPU query-chunked attention equals JAX's reference attention, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiermt.models import attention


def _qkv(queries, keys, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  shape = (2, queries, 3, 8)  # [batch, length, heads, head_dim]
  q = jax.random.normal(kq, shape, dtype)
  k = jax.random.normal(kk, (2, keys, 3, 8), dtype)
  v = jax.random.normal(kv, (2, keys, 3, 8), dtype)
  return q, k, v


@pytest.mark.parametrize("causal,queries,keys", [(True, 37, 37), (False, 37, 23), (True, 16, 16)])
def test_chunked_matches_reference_values_and_gradients(causal, queries, keys):
  # 37 queries in chunks of 16 leave a short last chunk; 16 is one exact chunk.
  q, k, v = _qkv(queries, keys)

  def loss(fn):
    # Weighting by a fixed random tensor makes every output element matter to the gradient.
    weights = jax.random.normal(jax.random.key(1), q.shape)
    return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

  chunked = lambda q, k, v: attention.chunked_attention(q, k, v, causal=causal, query_chunk=16)
  reference = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  # Jitted: op by op, each of the many small ops would compile on its own.
  np.testing.assert_allclose(jax.jit(chunked)(q, k, v), jax.jit(reference)(q, k, v), atol=1e-5)
  got = jax.jit(jax.grad(loss(chunked), argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(loss(reference), argnums=(0, 1, 2)))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-4)


def test_chunked_bfloat16_close_to_float32():
  q, k, v = _qkv(37, 37, jnp.bfloat16)
  got = attention.chunked_attention(q, k, v, causal=True, query_chunk=16)
  assert got.dtype == jnp.bfloat16
  want = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), is_causal=True)
  # bf16 keeps 8 mantissa bits; outputs are averages of unit-variance values.
  np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2)


def test_causal_needs_equal_lengths():
  q, k, v = _qkv(8, 9)
  with pytest.raises(ValueError, match="as many keys as queries"):
    attention.chunked_attention(q, k, v, causal=True)


def test_attend_uses_chunked_form_on_cpu():
  q, k, v = _qkv(300, 300)
  jaxpr = str(jax.make_jaxpr(lambda q, k, v: attention.attend(q, k, v, causal=True))(q, k, v))
  # 300 queries in chunks of QUERY_CHUNK=256: two score einsums, the second over 300 keys only.
  assert jaxpr.count("dot_general") == 4
  np.testing.assert_allclose(attention.attend(q, k, v, causal=True),
                             jax.nn.dot_product_attention(q, k, v, is_causal=True), atol=1e-5)
