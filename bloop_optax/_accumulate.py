"""Gradient accumulation of the ``(main, aux)`` pair before the surgery."""

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from bloop_optax import _checks
from bloop_optax import _pair
from bloop_optax import _tree_math as tm

PyTree = Any


class MultiStepsState(NamedTuple):
  """State of :func:`multi_steps`.

  Attributes:
    mini_step: int32 micro-batches accumulated since the last real step.
    gradient_step: int32 real steps taken by ``inner``.
    acc_grads: ``MainAux`` of the running sums of the main and aux gradients,
      shaped like the params (float32, or the params' dtype where wider).
    inner_state: the state of the wrapped transformation.
  """

  mini_step: jax.Array
  gradient_step: jax.Array
  acc_grads: _pair.MainAux
  inner_state: Any


def multi_steps(
  inner: optax.GradientTransformation, every_k: int
) -> optax.GradientTransformationExtraArgs:
  """Accumulates the ``(main, aux)`` pair over ``every_k`` micro-batches.

  ``optax.MultiSteps`` cannot wrap a pair-consuming chain: its accumulator is
  shaped like the params, so it rejects ``MainAux`` updates. This wrapper keeps
  one accumulator per half. On every ``every_k``-th call it hands the MEAN pair
  to ``inner`` (e.g. ``optax.chain(bloop(...), optax.adam(...))``), so the
  surgery and the EMA see the full-batch gradients once per real step; on the
  other calls it returns zero updates and leaves ``inner``'s state untouched.
  With equally sized micro-batches of a mean loss, the result equals the
  full-batch step.

  Args:
    inner: the pair-consuming transformation to apply once per ``every_k``
      micro-batches.
    every_k: number of micro-batches per real step (a Python int >= 1).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` taking ``MainAux(M, A)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import bloop_optax
    >>> tx = bloop_optax.multi_steps(
    ...     optax.chain(bloop_optax.mixed(1.0), optax.sgd(1.0)), every_k=2)
    >>> params = jnp.zeros(2)
    >>> state = tx.init(params)
    >>> pair = bloop_optax.MainAux(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]))
    >>> u1, state = tx.update(pair, state, params)
    >>> u2, state = tx.update(pair, state, params)
    >>> u1, u2
    (Array([0., 0.], dtype=float32), Array([-1., -1.], dtype=float32))
  """
  api = "multi_steps"
  _checks.check_int(every_k, "every_k", api, "an int >= 1", lambda v: v >= 1)

  def init_fn(params: PyTree) -> MultiStepsState:
    params = _checks.check_params(params, api)
    return MultiStepsState(
      mini_step=jnp.zeros([], jnp.int32),
      gradient_step=jnp.zeros([], jnp.int32),
      acc_grads=_pair.MainAux(tm.zeros_accumulator(params), tm.zeros_accumulator(params)),
      inner_state=inner.init(params),
    )

  def update_fn(updates, state: MultiStepsState, params=None, **extra):
    main, aux = _checks.check_pair(updates, api)
    _checks.check_against_params(main, state.acc_grads.main, api)
    add = lambda acc, g: acc + g.astype(acc.dtype)
    acc = _pair.MainAux(
      jax.tree.map(add, state.acc_grads.main, main),
      jax.tree.map(add, state.acc_grads.aux, aux),
    )
    mini_step = state.mini_step + 1

    def emit(_):
      mean = jax.tree.map(lambda s, g: (s / every_k).astype(g.dtype), acc, _pair.MainAux(main, aux))
      out, inner_state = inner.update(mean, state.inner_state, params, **extra)
      out = jax.tree.map(lambda u, g: u.astype(g.dtype), out, main)
      return out, MultiStepsState(
        mini_step=jnp.zeros([], jnp.int32),
        gradient_step=optax.safe_increment(state.gradient_step),
        acc_grads=jax.tree.map(jnp.zeros_like, acc),
        inner_state=inner_state,
      )

    def hold(_):
      return jax.tree.map(jnp.zeros_like, main), MultiStepsState(
        mini_step=mini_step,
        gradient_step=state.gradient_step,
        acc_grads=acc,
        inner_state=state.inner_state,
      )

    return jax.lax.cond(mini_step >= every_k, emit, hold, None)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
