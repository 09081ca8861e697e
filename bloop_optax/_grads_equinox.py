"""Equinox modules in :func:`bloop_optax.value_and_grads`: only the inexact-array
leaves are differentiated and the others are ``None`` in the gradients, as
``eqx.filter_grad`` does (``eqx.partition`` / ``eqx.combine`` in one object)."""

import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def module_type() -> type | None:
  """``eqx.Module`` if the user has imported Equinox (never imported here)."""
  eqx = sys.modules.get("equinox")
  return None if eqx is None else eqx.Module


def is_inexact_array(x: Any) -> bool:
  """Equinox's rule: a JAX or NumPy array of a floating or complex dtype."""
  return isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.inexact)


class Filtered:
  """A differentiated argument split into its inexact leaves and the rest."""

  def __init__(self, tree: Any):
    leaves, self.treedef = jax.tree.flatten(tree)
    self.mask = [is_inexact_array(x) for x in leaves]
    self.static = [None if m else x for x, m in zip(leaves, self.mask, strict=True)]
    self.diff = [x for x, m in zip(leaves, self.mask, strict=True) if m]

  def combine(self, diff: list[Any]) -> Any:
    """The argument rebuilt with ``diff`` as its inexact leaves."""
    it = iter(diff)
    leaves = [next(it) if m else s for s, m in zip(self.static, self.mask, strict=True)]
    return self.treedef.unflatten(leaves)

  def grads(self, diff_grads: list[Any]) -> Any:
    """Gradients shaped like the argument, ``None`` at the leaves not differentiated."""
    it = iter(diff_grads)
    return self.treedef.unflatten([next(it) if m else None for m in self.mask])
