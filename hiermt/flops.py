"""Counting the matmul work of a traced JAX program."""


def matmul_flops(jaxpr) -> int:
  """2 x multiply-adds of every matmul and convolution in a jaxpr, loops included.

  Scan bodies count `length` times and a `cond` counts its costliest branch.
  Element-wise work and FFTs are left out. Unlike XLA's cost analysis, which
  counts a loop body once, this gets recurrent layers (the CRNN's GRUs) right.
  """
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      contracted = 1
      for axis in lhs_contract:
        contracted *= lhs[axis]
      total += 2 * eqn.outvars[0].aval.size * contracted
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      out_channels = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += 2 * eqn.outvars[0].aval.size * (eqn.invars[1].aval.size // out_channels)
    elif name == "cond":
      total += max(matmul_flops(branch) for branch in eqn.params["branches"])
    else:
      inner = sum(matmul_flops(v) for v in eqn.params.values() if hasattr(v, "eqns"))
      total += inner * (eqn.params["length"] if name == "scan" else 1)
  return total
