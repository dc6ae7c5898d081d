"""matmul_flops counts every matmul a traced program runs."""

import jax
import jax.numpy as jnp

from hiermt import flops


def test_matmul_flops_counts_scan_bodies_length_times():
  w = jnp.ones((8, 8))
  step = lambda h, _: (h @ w, None)  # noqa: E731
  jaxpr = jax.make_jaxpr(lambda h: jax.lax.scan(step, h, None, length=5)[0])(jnp.ones((3, 8)))
  assert flops.matmul_flops(jaxpr) == 5 * 2 * 3 * 8 * 8


def test_matmul_flops_counts_convolutions_and_the_costlier_branch():
  x = jnp.ones((1, 4, 10))  # [batch, channels, width]
  kernel = jnp.ones((6, 4, 3))  # [out, in, width]
  conv = lambda x: jax.lax.conv_general_dilated(x, kernel, (1,), "VALID")  # noqa: E731  [1, 6, 8]
  assert flops.matmul_flops(jax.make_jaxpr(conv)(x)) == 2 * (1 * 6 * 8) * (4 * 3)
  w = jnp.ones((8, 8))
  pick = lambda p, h: jax.lax.cond(p, lambda h: h @ w @ w, lambda h: h, h)  # noqa: E731
  assert flops.matmul_flops(jax.make_jaxpr(pick)(True, jnp.ones((3, 8)))) == 2 * 2 * 3 * 8 * 8
