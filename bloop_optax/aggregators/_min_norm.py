"""Min-norm rules: MGDA (the min-norm point of the convex hull) and CAGrad (the
best worst-case improvement near the mean)."""

import math
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import optax

from bloop_optax import _checks
from bloop_optax import _qp
from bloop_optax.aggregators._base import _aggregator
from bloop_optax.aggregators._base import _no_key
from bloop_optax.aggregators._linalg import _normalized


def mgda_weights(gram: jax.Array) -> jax.Array:
  r"""MGDA: the weights of the min-norm point of the gradients' convex hull.

  .. math:: w = \arg\min_{w \ge 0,\ \sum_i w_i = 1} w^\top G w

  Solved exactly (an active-set method, see :mod:`bloop_optax.aggregators`);
  where the minimiser is not unique (collinear gradients) the direction
  :math:`\sum_i w_i g_i` still is. Scale: invariant.
  """
  return _qp.min_norm_simplex(_normalized(gram))


def cagrad_weights(gram: jax.Array, *, c: jax.typing.ArrayLike = 0.5) -> jax.Array:
  r"""CAGrad: the mean gradient, corrected toward the worst-off objective.

  With :math:`g_0 = \sum_i g_i / K` and :math:`g_w = \sum_i w_i g_i`,

  .. math::

    w^\star = \arg\min_{w \ge 0,\ \sum_i w_i = 1} \langle g_w, g_0\rangle
      + c \|g_0\| \|g_w\|, \qquad d = g_0 + \frac{c \|g_0\|}{\|g_{w^\star}\|}
      g_{w^\star},

  so :math:`w = 1 / K + c |g_0| w^* / |g_w^*|` (no final :math:`1 / (1 + c^2)` rescale).
  The inner problem is solved through its fixed point: ``w*`` is the point of
  the convex hull nearest to ``-t g_0`` (a simplex QP) at the root :math:`t` of
  :math:`|g_w(t)| = c |g_0| t`, found by bisection over a bracket that contains
  it (``mantissa bits + 10`` halvings, each QP warm-started; once both ends of
  the bracket share the QP's free set, the solution is affine in :math:`t` there
  and the remaining halvings take no QP). When :math:`g_0 = 0`
  or :math:`c = 0`, :math:`d = g_0`. When :math:`g_w^* = 0` (0 on the hull's boundary, or
  :math:`c \ge 1`), :math:`d` is undefined; like the reference implementation of
  Jacobian descent (TorchJD), the weights are then 0. :math:`|g_w^*|` counts as 0
  below :math:`\sqrt{eps}` times the longest gradient. Scale: invariant.
  """
  g = _normalized(gram)
  k = g.shape[0]
  dtype = g.dtype
  mean = jnp.full([k], 1 / k, dtype)
  # Sums rather than products with the constant ``mean``: jax 0.6 refuses a
  # matrix product between an array on an explicit mesh and a constant.
  gb = jnp.sum(g, axis=1) / k  # G 1 / K
  radius = jnp.asarray(c, dtype) * jnp.sqrt(jnp.maximum(jnp.sum(gb) / k, 0))  # c |g_0|
  longest = jnp.sqrt(jnp.max(jnp.diag(g)))
  live = radius > 0
  safe_radius = jnp.where(live, radius, 1)

  def h(t, x, free, inverse):
    # Each QP starts from the last one's solution and, for a large K, the
    # inverse of its free block (so no eigendecomposition is needed to start).
    x, free, _, inverse = _qp.active_set(g, t * gb, x, free, simplex=True, inverse0=inverse)
    return jnp.sqrt(jnp.maximum(x @ g @ x, 0)) - safe_radius * t, x, free, inverse

  iters = jnp.finfo(dtype).nmant + 10
  hi0 = 2 * longest / safe_radius

  def turn(state):
    i, lo, hi, x_lo, free_lo, x_hi, free_hi, x, free, inverse = state
    # Turn 0 solves at t = 0 (MGDA's min-norm point, from the best vertex),
    # turn 1 at the bracket's top, each later turn at its midpoint, each
    # warm-started from the last solution: one traced QP for all of them.
    t = jnp.where(i == 0, 0, jnp.where(i == 1, hi0, (lo + hi) / 2))
    value, x, free, inverse = h(t, x, free, inverse)
    halving = i > 1
    up = halving & (value >= 0)
    down = halving & ~(value >= 0)
    to_lo, to_hi = up | (i == 0), down | (i == 1)
    return (
      i + 1,
      jnp.where(up, t, lo),
      jnp.where(down, t, hi),
      jnp.where(to_lo, x, x_lo),
      jnp.where(to_lo, free, free_lo),
      jnp.where(to_hi, x, x_hi),
      jnp.where(to_hi, free, free_hi),
      x,
      free,
      inverse,
    )

  def halving_on(state):
    # Halve until the bracket's ends share their free set (then the solution
    # is affine in t between them) or the halvings run out.
    i, _, _, _, free_lo, _, free_hi, _, _, _ = state
    return (i < 2) | ((i < iters + 2) & jnp.any(free_lo != free_hi))

  vertex = (jnp.arange(k) == jnp.argmin(jnp.diag(g))).astype(dtype)
  ends = (vertex, vertex > 0)  # each end's solution and free set, and the last ones
  inverse = _qp.start_inverse(g, vertex > 0) if _qp.carries(k, 1) else ()
  start = (jnp.zeros([], jnp.int32), jnp.zeros([], dtype), hi0, *ends, *ends, *ends, inverse)
  i, lo, hi, x_lo, _, x_hi, _, _, _, _ = lax.while_loop(halving_on, turn, start)
  # Between lo and hi the QP's solution is x_lo + s (x_hi - x_lo), s = (t - lo) /
  # (hi - lo): both ends satisfy the optimality conditions of one free set,
  # which are linear in t, and so does every point between them. The rest of
  # the halvings take |g_w(t)| along that segment, without a QP. (Where the
  # halvings ran out first, the bracket is already as narrow as the bisection
  # makes it, and the segment between its ends stands for the solution there.)
  base, width = lo, jnp.where(hi > lo, hi - lo, 1)
  step = x_hi - x_lo

  def interpolated(t):
    x = x_lo + (t - base) / width * step
    return x, jnp.sqrt(jnp.maximum(x @ g @ x, 0))

  def halve(_, bracket):
    a, b = bracket
    mid = (a + b) / 2
    up = interpolated(mid)[1] - safe_radius * mid >= 0
    return jnp.where(up, mid, a), jnp.where(up, b, mid)

  bottom, top = lax.fori_loop(i - 2, iters, halve, (lo, hi))
  x, norm = interpolated((bottom + top) / 2)
  at_zero = (bottom == 0) | ~(norm > jnp.sqrt(jnp.finfo(dtype).eps) * longest)
  corrected = mean + safe_radius / jnp.where(at_zero, 1, norm) * x
  return jnp.where(live, jnp.where(at_zero, jnp.zeros_like(mean), corrected), mean)


def mgda(
  num_objectives: int,
  *,
  ema_decay: jax.typing.ArrayLike | None = None,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""MGDA: the min-norm point of the convex hull of the K gradients.

  .. math:: d = \sum_i w_i g_i, \quad w = \arg\min_{w \ge 0,\ \sum_i w_i = 1}
    w^\top G w,

  with :math:`G_ij = \langle g_i, g_j\rangle`. :math:`d` is a common descent direction of every
  objective (or 0 at a Pareto-stationary point). The simplex QP is solved
  exactly inside ``jit`` (see :func:`mgda_weights`).

  Args:
    num_objectives: the number :math:`K` of objectives: the length of the
      tuple of gradients ``update`` takes.
    ema_decay: ``None`` (default: the method as published) or :math:`\beta` in
      [0, 1], the weight on the OLD average as in ``optax.ema``: the weights
      are then decided from the Gram matrix of EMAs :math:`E_i' = \beta E_i + (1 - \beta) g_i`
      of the gradients, kept in the state, and applied to the current
      gradients. ``ema_decay=0`` equals ``None``.
    accumulator_dtype: dtype of the EMAs (default float32, or the params'
      dtype where wider).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    :math:`(grads_0, \ldots, grads_{K-1})` (a tuple, or a mapping with keys
    ``0..K-1``) and returns :math:`d` shaped like ``grads_0``; its state is an
    :class:`AggregatorState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.mgda(2)
    >>> g1, g2 = jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0])
    >>> d, state = tx.update((g1, g2), tx.init(g1))
    >>> d  # the point of the segment [g1, g2] nearest to 0
    Array([0.8, 0.4], dtype=float32)

  References:
    Désidéri, "Multiple-gradient descent algorithm (MGDA) for multiobjective
    optimization", C. R. Math. 2012; Sener and Koltun, "Multi-Task Learning as
    Multi-Objective Optimization", NeurIPS 2018.
  """
  rule = _no_key(mgda_weights)
  return _aggregator("aggregators.mgda", num_objectives, rule, ema_decay, accumulator_dtype)


def cagrad(
  num_objectives: int,
  *,
  c: jax.typing.ArrayLike = 0.5,
  ema_decay: jax.typing.ArrayLike | None = None,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""CAGrad: the mean gradient, corrected toward the worst-off objective.

  :math:`d = g_0 + c |g_0| g_w / |g_w|` with :math:`g_0` the mean gradient and :math:`g_w`
  the minimiser over the convex hull of :math:`\langle g_w, g_0\rangle + c |g_0| |g_w|` (see
  :func:`cagrad_weights`: the exact fixed point, found by bisection, no
  solver library). :math:`c = 0` is :func:`mean`.

  Args:
    num_objectives: the number :math:`K` of objectives.
    c: :math:`c \ge 0`, the radius of the ball around :math:`g_0` (relative to
      :math:`|g_0|`) in which the worst objective's decrease is maximised; the
      paper's convergence guarantee needs :math:`c < 1`.
    ema_decay: ``None`` (default) or :math:`\beta`: decide the weights from the EMAs'
      Gram matrix, as in :func:`mgda`.
    accumulator_dtype: dtype of the EMAs.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; see :func:`mgda`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.cagrad(1, c=0.5)
    >>> d, _ = tx.update((jnp.array([2.0, 0.0]),), tx.init(jnp.zeros(2)))
    >>> d  # one objective: (1 + c) g
    Array([3., 0.], dtype=float32)

  References:
    Liu, Liu, Jin, Stone, Liu, "Conflict-Averse Gradient Descent for
    Multi-task Learning", NeurIPS 2021.
  """
  api = "aggregators.cagrad"
  _checks.check_number(c, "c", api, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)
  rule = _no_key(lambda gram: cagrad_weights(gram, c=c))
  return _aggregator(api, num_objectives, rule, ema_decay, accumulator_dtype)
