r"""Shared and task-specific parameters: an aggregator applied to the shared ones.

A multi-task model is usually a shared trunk followed by one head per task. The
multi-task literature (MGDA-UB, LibMTL, TorchJD's ``mtl_backward``) aggregates
only the *shared* parameters' K gradients; each task-specific parameter gets
its own task's gradient. :func:`on_shared` gives that semantics to any
aggregator of :mod:`bloop_optax.aggregators`.
"""

from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from bloop_optax import _pair
from bloop_optax import _tree_math as tm
from bloop_optax._partition import _is_placeholder

PyTree = Any


class SharedParamsState(NamedTuple):
  """State of :func:`bloop_optax.aggregators.on_shared`.

  Attributes:
    inner: the state of the wrapped aggregator, which sees only the shared
      parameters (its EMAs, if any, are shaped like them; the task-specific
      parameters' places hold ``optax.MaskedNode``).
  """

  inner: Any


def _full_mask(shared: Any, tree: PyTree, api: str) -> PyTree:
  """``shared`` (a bool pytree shaped like ``tree`` or a prefix of it, or a
  callable returning one) as a bool per leaf of ``tree``."""
  mask = shared(tree) if callable(shared) else shared
  try:
    full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), mask, tree)
  except (ValueError, TypeError) as err:
    raise ValueError(
      f"{api}: expected shared to be a pytree of bools with the structure of the parameters"
      f" (or a prefix of it, e.g. {{'trunk': True, 'heads': False}}), or a callable returning"
      f" one from the parameters, as optax.masked takes; it does not match the gradients"
      f" ({err})."
    ) from None
  for path, m in jax.tree_util.tree_flatten_with_path(full)[0]:
    if not isinstance(m, (bool, jnp.bool_)):
      raise TypeError(
        f"{api}: expected a Python bool in shared at {jax.tree_util.keystr(path)} (which"
        f" parameters are shared is fixed when the step is traced); got"
        f" {type(m).__name__} {str(m)[:40]}."
      )
  flags = jax.tree.leaves(full)
  if not any(flags):
    raise ValueError(
      f"{api}: shared selects none of the {len(flags)} parameter arrays; mark the shared"
      " trunk True (the aggregator decides its weights from its gradients)."
    )
  return full


def _select(mask: PyTree, tree: PyTree, keep: bool) -> PyTree:
  """``tree`` with the leaves whose mask is not ``keep`` replaced by
  ``optax.MaskedNode()``."""
  return jax.tree.map(lambda m, x: x if bool(m) == keep else optax.MaskedNode(), mask, tree)


def on_shared(
  inner: optax.GradientTransformation, shared: PyTree | Callable[[PyTree], PyTree]
) -> optax.GradientTransformationExtraArgs:
  r"""An aggregator of the shared parameters; every other parameter gets the sum of its gradients.

  For K task losses of a model with shared parameters :math:`\theta_s` (a trunk)
  and task-specific ones :math:`\theta_t` (heads), the direction is

  .. math:: d_s = \sum_i w_i \nabla_{\theta_s} L_i, \qquad
    d_t = \sum_i \nabla_{\theta_t} L_i,

  with the weights :math:`w` that ``inner`` decides from the Gram matrix of the
  shared parameters' K gradients alone (or of their EMAs). A head that only
  task :math:`i` reads has zero gradient for the other tasks, so it gets its own
  task's gradient. This is what TorchJD's ``mtl_backward`` with ``jac_to_grad``,
  LibMTL and MGDA-UB compute. Without the wrapper, an aggregator takes the
  full-parameter gradients: the heads' norms enter the Gram matrix and the
  weights, and each head's update is scaled by its task's weight.

  Args:
    inner: an aggregator of :mod:`bloop_optax.aggregators` for K objectives.
    shared: which parameters are shared, as ``optax.masked`` takes a mask: a
      pytree of Python bools with the parameters' structure or a prefix of it
      (``{"trunk": True, "heads": False}``), or a callable returning one from
      the gradients' tree (shaped like the parameters).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` on the tuple of K gradients,
    returning one direction shaped like a gradient; its state is a
    :class:`SharedParamsState`. A NaN or an Inf in a shared gradient makes the
    whole shared direction NaN (and ``inner`` skips the step, as it does
    alone); one in a task-specific gradient shows in that parameter's sum.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.on_shared(aggregators.mgda(2), {"trunk": True, "head": False})
    >>> g1 = {"trunk": jnp.array([1.0, 0.0]), "head": jnp.array([5.0, 0.0])}
    >>> g2 = {"trunk": jnp.array([0.0, 1.0]), "head": jnp.array([0.0, 7.0])}
    >>> d, _ = tx.update((g1, g2), tx.init(g1))
    >>> d["trunk"].round(6), d["head"]  # MGDA of the trunk's gradients; each head its own
    (Array([0.5, 0.5], dtype=float32), Array([5., 7.], dtype=float32))

  References:
    Sener and Koltun, "Multi-Task Learning as Multi-Objective Optimization",
    NeurIPS 2018 (the shared parameters' Jacobian); Quinton and Rey, "Jacobian
    Descent for Multi-Objective Optimization", arXiv:2406.16232 (TorchJD's
    ``mtl_backward``).
  """
  api = "aggregators.on_shared"
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
      f"{api}: expected inner to be an aggregator of bloop_optax.aggregators (an optax"
      f" GradientTransformation), e.g. aggregators.upgrad(K); got {type(inner).__name__}."
    )
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    if _is_placeholder(params):  # optax.tree.map_params: the inner state holds the params
      return SharedParamsState(inner.init(params))
    mask = _full_mask(shared, params, api)
    return SharedParamsState(inner.init(_select(mask, params, True)))

  def update_fn(updates, state, params=None, **extra):
    n = len(updates) if isinstance(updates, (tuple, list, Mapping)) else 0
    grads = _pair.split_objectives_checked(updates, max(n, 1), api)
    mask = _full_mask(shared, grads[0], api)
    flags = jax.tree.leaves(mask)
    direction, inner_state = inner.update(
      tuple(_select(mask, g, True) for g in grads),
      state.inner,
      None if params is None else _select(mask, params, True),
      **extra,
    )
    # Each task-specific leaf: the sum of its K gradients (its own task's where
    # only one task reads it).
    per_leaf = list(zip(*(jax.tree.leaves(g) for g in grads), strict=True))
    shared_out = iter(jax.tree.leaves(direction))
    leaves = [next(shared_out) if f else _sum(xs) for xs, f in zip(per_leaf, flags, strict=True)]
    return jax.tree.unflatten(jax.tree.structure(grads[0]), leaves), SharedParamsState(inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _sum(xs: tuple[jax.Array, ...]) -> jax.Array:
  """The sum of one leaf's K gradients, accumulated in at least float32 (an
  array several gradients share, e.g. the zeros of another task's head, read
  once)."""
  return tm.linear_combination([jnp.ones([], jnp.float32)] * len(xs), list(xs))
