"""Plain pytrees in :func:`bloop_optax.value_and_grads`, as ``jax.grad`` takes them.

An argument holding an Equinox module (or, in Flax NNX's tree mode, an NNX
module) is filtered to its inexact-array leaves; in tree mode the NNX Variables'
values after the forward pass are written back into the objects passed in.
"""

from collections.abc import Callable
from typing import Any

import jax

from bloop_optax import _checks
from bloop_optax import _grads_equinox
from bloop_optax import _grads_nnx


class PytreeCall:
  """One call of ``fun`` on pytree arguments, in the shape every adapter has:
  ``diff`` (what is differentiated), ``call`` (rebuild the arguments inside the
  trace and run ``fun``), ``finish`` (write state back), ``grads`` (gradients
  per differentiated argument)."""

  def __init__(self, args: tuple, kwargs: dict, nums: tuple[int, ...], tree_mode: bool):
    self.args, self.kwargs, self.nums, self.tree_mode = args, kwargs, nums, tree_mode
    eqx_module = _grads_equinox.module_type()
    self.filtered = {}
    for n in nums:
      if (
        eqx_module is not None and _checks.holds(args[n], lambda x: isinstance(x, eqx_module))
      ) or (tree_mode and _checks.holds(args[n], _grads_nnx.is_object)):
        self.filtered[n] = _grads_equinox.Filtered(args[n])
      else:
        _checks.check_differentiable(args[n], f"argument {n} (in argnums)")
    # The other arguments are closed over. Rebuilding their pytrees inside the
    # traced function gives pytree nodes that record the inner trace.
    self.leaves, self.treedef = jax.tree.flatten((args, kwargs))
    self.diff = tuple(self.filtered[n].diff if n in self.filtered else args[n] for n in nums)

  def call(self, fun: Callable[..., Any], diff: tuple) -> tuple[Any, Any]:
    full_args, full_kwargs = jax.tree.unflatten(self.treedef, self.leaves)
    full_args = list(full_args)
    for n, value in zip(self.nums, diff, strict=True):
      full_args[n] = self.filtered[n].combine(value) if n in self.filtered else value
    losses, data = fun(*full_args, **full_kwargs)
    if self.tree_mode:  # the Variables' values after the forward pass, to write back
      data = (data, [_grads_nnx.get(v) for v in _grads_nnx.variables((full_args, full_kwargs))])
    return losses, data

  def finish(self, data: Any) -> Any:
    if self.tree_mode:
      data, values = data
      for variable, value in zip(
        _grads_nnx.variables((self.args, self.kwargs)), values, strict=True
      ):
        _grads_nnx.set(variable, value)
    return data

  def grads(self, diff_grads: tuple) -> tuple:
    return tuple(
      self.filtered[n].grads(g) if n in self.filtered else g
      for n, g in zip(self.nums, diff_grads, strict=True)
    )
