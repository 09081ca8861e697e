"""Projections onto the dual cone of the gradients: UPGrad and DualProj."""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from bloop_optax.aggregators._base import _aggregator
from bloop_optax.aggregators._base import _no_key
from bloop_optax.aggregators._linalg import _normalized
from bloop_optax.aggregators._linalg import _onto_dual_cone


def upgrad_weights(gram: jax.Array) -> jax.Array:
  r"""UPGrad: the mean of every gradient projected onto the dual cone.

  The projection of ``g_i / K`` onto :math:`\{d : \langle d, g_j\rangle \ge 0 \text{ for all } j\}`
  is :math:`J^T v_i` with :math:`v_i = \operatorname{argmin}_{v \ge e_i / K} v^T G v`;
  :math:`w = \sum_i v_i`. Each problem is solved exactly (an active-set method on
  :math:`v - e_i / K \ge 0`). Scale: invariant.
  """
  g = _normalized(gram)
  k = g.shape[0]
  units = jnp.eye(k, dtype=g.dtype) / k
  return jnp.sum(_onto_dual_cone(g, units), axis=0)  # the K problems together


def dualproj_weights(gram: jax.Array) -> jax.Array:
  r"""DualProj: the mean gradient projected onto the dual cone.

  The projection of :math:`g_0 = \sum_i g_i / K` onto
  :math:`\{d : \langle d, g_j\rangle \ge 0 \text{ for all } j\}` is :math:`J^T v` with
  :math:`v = \operatorname{argmin}_{v \ge \mathbf{1} / K} v^T G v`, solved exactly (the
  active-set method of :func:`upgrad_weights`). Where the mean conflicts with no
  gradient it is the mean. Scale: invariant.
  """
  g = _normalized(gram)
  k = g.shape[0]
  return _onto_dual_cone(g, jnp.full([k], 1 / k, g.dtype))


def upgrad(
  num_objectives: int,
  *,
  ema_decay: jax.typing.ArrayLike | None = None,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""UPGrad: the mean of the gradients, each projected onto the dual cone.

  Each ``g_i / K`` is projected onto :math:`\{d : \langle d, g_j\rangle \ge 0 \text{ for all } j\}`
  (so no objective increases to first order) and the projections are summed
  (see :func:`upgrad_weights`). Where no gradients conflict it is
  :func:`mean`.

  Args:
    num_objectives: the number :math:`K` of objectives.
    ema_decay: ``None`` (default) or :math:`\beta`: decide the weights from the EMAs'
      Gram matrix, as in :func:`mgda`.
    accumulator_dtype: dtype of the EMAs.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; see :func:`mgda`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.upgrad(2)
    >>> g1, g2 = jnp.array([1.0, 0.0]), jnp.array([-1.0, 1.0])
    >>> d, _ = tx.update((g1, g2), tx.init(g1))
    >>> d  # (g1 off g2 + g2 off g1) / 2
    Array([0.25, 0.75], dtype=float32)

  References:
    Quinton and Rey, "Jacobian Descent for Multi-Objective Optimization",
    arXiv:2406.16232.
  """
  rule = _no_key(upgrad_weights)
  return _aggregator("aggregators.upgrad", num_objectives, rule, ema_decay, accumulator_dtype)


def dualproj(
  num_objectives: int,
  *,
  ema_decay: jax.typing.ArrayLike | None = None,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""DualProj: the mean gradient, projected onto the dual cone.

  :math:`g_0 = \sum_i g_i / K` is projected onto
  :math:`\{d : \langle d, g_j\rangle \ge 0 \text{ for all } j\}` (see
  :func:`dualproj_weights`), so no objective increases to first order. Where the
  mean conflicts with no gradient it is :func:`mean`. :func:`upgrad` projects
  each gradient instead and averages the projections.

  Args:
    num_objectives: the number :math:`K` of objectives.
    ema_decay: ``None`` (default) or :math:`\beta`: decide the weights from the EMAs'
      Gram matrix, as in :func:`mgda`.
    accumulator_dtype: dtype of the EMAs.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; see :func:`mgda`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.dualproj(2)
    >>> g1, g2 = jnp.array([1.0, 0.0]), jnp.array([-2.0, 1.0])
    >>> d, _ = tx.update((g1, g2), tx.init(g1))
    >>> d  # the mean (-0.5, 0.5) conflicts with g1: projected onto <d, g1> = 0
    Array([0. , 0.5], dtype=float32)

  References:
    Quinton and Rey, "Jacobian Descent for Multi-Objective Optimization",
    arXiv:2406.16232 (the DualProj aggregator).
  """
  rule = _no_key(dualproj_weights)
  return _aggregator("aggregators.dualproj", num_objectives, rule, ema_decay, accumulator_dtype)
