"""Pieces shared by the two encoders: width scaling and bidirectional RNNs.

The CRNN uses `BiGRU`, HPPNet `BiLSTM`. Each layer runs as a single `lax.scan`: both directions (the backward one on
time-reversed input) and, optionally, a group of independent RNNs (the CRNN's
four acoustic models, HPPNet's three frame-subnet heads) are stacked on one
leading axis, and the input projection for every step is one matmul before the
loop. That keeps the number of sequential loops, which dominate both XLA
compile time and per-step overhead on accelerators, as small as the model
allows. Gate layouts and the two bias vectors per direction follow PyTorch's
`nn.GRU` / `nn.LSTM`, so parameter counts match the published models.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def scaled(size, width):
  """A layer size multiplied by an encoder's `width`, rounded, at least 1."""
  return max(1, int(round(size * width)))


def _stacked_orthogonal(key, shape, dtype=jnp.float32):
  """An independent orthogonal [rows, cols] matrix for every leading index."""
  count = int(np.prod(shape[:-2]))
  keys = jax.random.split(key, count)
  matrices = jax.vmap(lambda k: nn.initializers.orthogonal()(k, shape[-2:], dtype))(keys)
  return matrices.reshape(shape)


def _bidirectional_scan(module, x, gates, states, step):
  """Shared body of `BiGRU` and `BiLSTM`.

  Args:
    module: the calling layer; owns the parameters and has `features`,
      `groups` and `dtype` attributes.
    x: [batch, time, in], or [groups, batch, time, in] when `module.groups`.
    gates: number of gate blocks (3 for a GRU, 4 for an LSTM).
    states: number of state arrays in the carry (1 for a GRU, 2 for an LSTM).
    step: (carry, input_gates, hidden_gates) -> (carry, hidden), gates
      [stack, batch, gates * features] float32, carry a tuple of `states`
      float32 [stack, batch, features] arrays whose first is the hidden state.

  Returns:
    x's shape with `in` replaced by 2 * features: forward, then backward.
  """
  features, groups, dtype = module.features, module.groups, module.dtype
  lead = () if groups is None else (groups,)
  grouped = x if groups is not None else x[None]  # [groups, batch, time, in]
  num_groups, batch, time, channels = grouped.shape
  width = gates * features
  # Kong's GRU init: fan-in uniform for input weights, orthogonal recurrent weights, zero biases.
  params = [
      module.param("input_kernel", nn.initializers.lecun_uniform(batch_axis=tuple(range(len(lead) + 1))),
                   (*lead, 2, channels, width)),
      module.param("input_bias", nn.initializers.zeros, (*lead, 2, width)),
      module.param("recurrent_kernel", _stacked_orthogonal, (*lead, 2, features, width)),
      module.param("recurrent_bias", nn.initializers.zeros, (*lead, 2, width)),
  ]
  # [stack = groups * 2, ...]
  input_kernel, input_bias, recurrent_kernel, recurrent_bias = (
      p.astype(dtype).reshape(num_groups * 2, *p.shape[len(lead) + 1:]) for p in params)

  both = jnp.stack([grouped, grouped[:, :, ::-1]], axis=1).astype(dtype)  # [groups, 2, batch, time, in]
  both = both.reshape(num_groups * 2, batch, time, channels)
  input_gates = jnp.einsum("sbti,sig->tsbg", both, input_kernel) + input_bias[:, None]  # [time, stack, batch, width]

  def body(carry, gates_t):
    hidden_gates = jnp.einsum("sbh,shg->sbg", carry[0].astype(dtype), recurrent_kernel)
    hidden_gates = hidden_gates + recurrent_bias[:, None]  # [stack, batch, width]
    return step(carry, gates_t.astype(jnp.float32), hidden_gates.astype(jnp.float32))

  carry = (jnp.zeros((num_groups * 2, batch, features), jnp.float32),) * states
  _, hidden = jax.lax.scan(body, carry, input_gates)  # [time, stack, batch, features]
  hidden = hidden.reshape(time, num_groups, 2, batch, features)
  forward = jnp.moveaxis(hidden[:, :, 0], 0, 2)  # [groups, batch, time, features]
  backward = jnp.moveaxis(hidden[::-1, :, 1], 0, 2)
  out = jnp.concatenate([forward, backward], axis=-1).astype(dtype)  # [groups, batch, time, 2 * features]
  return out if groups is not None else out[0]


class BiGRU(nn.Module):
  """Single-layer bidirectional GRU, PyTorch gate order (r, z, n).

  [batch, time, in] -> [batch, time, 2 * features]; with `groups`, that many
  independent GRUs on [groups, batch, time, in].
  """
  features: int
  groups: int | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    def step(carry, xg, hg):
      (h,) = carry
      xr, xz, xn = jnp.split(xg, 3, axis=-1)
      hr, hz, hn = jnp.split(hg, 3, axis=-1)
      r = jax.nn.sigmoid(xr + hr)
      z = jax.nn.sigmoid(xz + hz)
      n = jnp.tanh(xn + r * hn)
      h = (1.0 - z) * n + z * h
      return (h,), h

    return _bidirectional_scan(self, x, 3, 1, step)


class BiLSTM(nn.Module):
  """Single-layer bidirectional LSTM, PyTorch gate order (i, f, g, o).

  [batch, time, in] -> [batch, time, 2 * features]; with `groups`, that many
  independent LSTMs on [groups, batch, time, in].
  """
  features: int
  groups: int | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    def step(carry, xg, hg):
      h, c = carry
      i, f, g, o = jnp.split(xg + hg, 4, axis=-1)
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      h = jax.nn.sigmoid(o) * jnp.tanh(c)
      return (h, c), h

    return _bidirectional_scan(self, x, 4, 2, step)
