"""One gradient per loss from one linearization, read off its jaxpr.

``value_and_grads`` linearizes the losses once and pulls each back alone. A
transpose of the whole linearization per loss would trace every loss's
equations K times (K^2 work for K task heads, each head's gradient K arrays of
zeros). Here the linearization is traced once; each loss is transposed through
the equations it depends on only, with respect to the leaves it reads, so a
regulariser's gradient costs no backward pass through the network and a task
head's loss none through the other heads; every other leaf of its gradient is
one zero array shared by all the losses.
"""

from typing import Any

import jax
import jax.extend
import jax.numpy as jnp


def _is_literal(v: Any) -> bool:
  return type(v).__name__ == "Literal"


def _debug_info(jaxpr, kept: list[int], output: int):
  """The jaxpr's debug information for the inputs ``kept`` and one output."""
  info = getattr(jaxpr, "debug_info", None)
  if info is None or not hasattr(info, "_replace"):
    return info
  names, paths = info.arg_names, info.result_paths
  return info._replace(
    arg_names=None if names is None else tuple(names[i] for i in kept),
    result_paths=(paths[output],) if isinstance(paths, tuple) else None,
  )


def pullbacks(linear_fn, leaves: list[Any], treedef, losses) -> list[list[Any]]:
  """The gradient of each loss with respect to every leaf, as lists of leaves.

  ``linear_fn`` is the linearization of the losses (``jax.linearize``'s
  tangent function) at the point whose flattened leaves are ``leaves``. Raises
  if its jaxpr cannot be read this way (the caller then transposes it whole).
  """
  closed = jax.make_jaxpr(linear_fn)(*jax.tree.unflatten(treedef, leaves))
  jaxpr = closed.jaxpr
  if len(jaxpr.invars) != len(leaves) or len(jaxpr.outvars) != len(losses):
    raise ValueError("the linearization's jaxpr does not match its arguments")
  eqns = jaxpr.eqns
  position = {v: i for i, v in enumerate(jaxpr.invars)}
  producer = {v: n for n, eqn in enumerate(eqns) for v in eqn.outvars}
  zeros = [jnp.zeros_like(x) for x in leaves]
  grads = []
  for k, (out, loss) in enumerate(zip(jaxpr.outvars, losses, strict=True)):
    grad = list(zeros)
    grads.append(grad)
    if _is_literal(out):
      continue
    # The equations ``out`` depends on, and the leaves they read.
    found, stack, reads = set(), [out], {}
    while stack:
      v = stack.pop()
      if v in position:
        reads[position[v]] = v
      n = producer.get(v)
      if n is None or n in found:
        continue
      found.add(n)
      stack.extend(u for u in eqns[n].invars if not _is_literal(u))
    if not reads:
      continue
    needed = sorted(reads)
    pruned = jaxpr.replace(
      invars=[reads[i] for i in needed],
      outvars=[out],
      eqns=[eqns[n] for n in sorted(found)],
      debug_info=_debug_info(jaxpr, needed, k),
    )
    fn = jax.extend.core.jaxpr_as_fun(jax.extend.core.ClosedJaxpr(pruned, closed.consts))
    cts = jax.linear_transpose(lambda *a, fn=fn: fn(*a)[0], *(leaves[i] for i in needed))(
      jnp.ones_like(loss)
    )
    for i, ct in zip(needed, cts, strict=True):
      grad[i] = ct
  return grads
