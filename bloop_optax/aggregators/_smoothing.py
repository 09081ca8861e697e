"""Rules that carry weights across steps: MoCo (tracked gradients) and CR-MOGM
(smoothed weights of any aggregator)."""

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from bloop_optax import _checks
from bloop_optax import _pair
from bloop_optax import _tree_math as tm
from bloop_optax.aggregators._base import AggregatorState
from bloop_optax.aggregators._base import _aggregator
from bloop_optax.aggregators._base import _check_count
from bloop_optax.aggregators._linalg import _normalized
from bloop_optax.aggregators._linalg import _onto_simplex


def moco_weights(
  gram: jax.Array,
  weights: jax.Array,
  *,
  step_size: jax.typing.ArrayLike = 0.1,
  rho: jax.typing.ArrayLike = 0.0,
) -> jax.Array:
  r"""One MoCo step of the weights on the simplex.

  .. math:: \lambda' = \Pi_\Delta\big(\lambda - \gamma (\hat G + \rho I) \lambda\big)

  A projected gradient step on :math:`\lambda^\top (\hat G + \rho I) \lambda / 2` over the
  simplex (toward MGDA's min-norm weights), with :math:`\hat G = G / \max_i G_{ii}` so that
  the step :math:`\gamma` (``step_size``) does not depend on the gradients' scale.

  Args:
    gram: ``[K, K]``, the Gram matrix of the tracked gradients.
    weights: ``[K]``, the current :math:`\lambda` on the simplex.
    step_size: :math:`\gamma > 0`.
    rho: :math:`\rho \ge 0`, the regulariser.
  """
  g = _normalized(gram)
  lam = weights.astype(g.dtype)
  pull = jnp.sum(g * lam[None, :], axis=1) + jnp.asarray(rho, g.dtype) * lam
  return _onto_simplex(lam - jnp.asarray(step_size, g.dtype) * pull)


def moco(
  num_objectives: int,
  *,
  ema_decay: jax.typing.ArrayLike = 0.9,
  step_size: jax.typing.ArrayLike = 0.1,
  rho: jax.typing.ArrayLike = 0.0,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""MoCo: track the gradients, move the weights a step at a time, follow both.

  Each step updates the tracked gradients :math:`y_i \leftarrow \beta y_i + (1 - \beta) g_i`
  (the EMAs, ``ema_decay`` = :math:`\beta`; the paper's tracking rate is
  :math:`1 - \beta`), then the weights by one projected gradient step
  :math:`\lambda \leftarrow \Pi_\Delta(\lambda - \gamma (\hat G_y + \rho I) \lambda)` on the
  tracked gradients' Gram matrix (see :func:`moco_weights`), and returns
  :math:`d = \sum_i \lambda_i y_i`: the direction is built from the tracked gradients,
  not the current ones. :math:`\lambda` starts at :math:`1 / K` and lives in the state
  (``rule_state``). The weights move slowly toward MGDA's, which is what makes the
  method convergent with stochastic gradients. Variant: the paper's Algorithm 1
  without its optional projection of the tracked gradients onto a bounded set,
  with a constant :math:`\beta` and :math:`\gamma` (``optax.inject_hyperparams`` can
  schedule both), and with :math:`\hat G` normalised by its largest diagonal entry so
  that :math:`\gamma` is scale free.

  Args:
    num_objectives: the number :math:`K` of objectives.
    ema_decay: :math:`\beta \in [0, 1]`, the weight on the old tracked gradient
      (0: the current gradients, no tracking).
    step_size: :math:`\gamma > 0`, the weights' step.
    rho: :math:`\rho \ge 0`, the regulariser of the weights' problem.
    accumulator_dtype: dtype of the tracked gradients.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; see :func:`mgda`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.moco(2, ema_decay=0.0, step_size=0.5)
    >>> g1, g2 = jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0])
    >>> d, state = tx.update((g1, g2), tx.init(g1))
    >>> state.rule_state  # the step gives (0.4375, 0.25); onto the simplex
    Array([0.59375, 0.40625], dtype=float32)

  References:
    Fernando, Shen, Liu, Chaudhury, Murugesan, Chen, "Mitigating Gradient Bias
    in Multi-objective Learning: A Provably Convergent Approach", ICLR 2023.
  """
  api = "aggregators.moco"
  k = _check_count(num_objectives, api)
  if ema_decay is None:
    raise TypeError(
      f"{api}: expected ema_decay to be a number in [0, 1] (MoCo tracks the gradients;"
      " 0 tracks nothing); got None."
    )
  _checks.check_number(step_size, "step_size", api, "a number > 0", lambda v: v > 0)
  _checks.check_number(rho, "rho", api, "a number >= 0", lambda v: v >= 0)

  def rule(gram, log2_scale, key, weights):
    new = moco_weights(gram, weights, step_size=step_size, rho=rho)
    return new, new.astype(weights.dtype)

  start = jnp.full([k], 1 / k, jnp.float32)
  return _aggregator(
    api, k, rule, ema_decay, accumulator_dtype, rule_state=start, apply_to_emas=True
  )


class SmoothedWeightsState(NamedTuple):
  r"""State of :func:`~bloop_optax.aggregators.cr_mogm`.

  Attributes:
    inner: the state of the wrapped aggregator (its ``objective_weights`` are
      the weights it chose at the last step).
    objective_weights: float32 ``[K]``, the smoothed weights :math:`\lambda`
      applied at the last step (:math:`d = \sum_i \lambda_i g_i`).
  """

  inner: AggregatorState
  objective_weights: jax.Array


def cr_mogm(
  inner: optax.GradientTransformation, *, weights_decay: jax.typing.ArrayLike = 0.9
) -> optax.GradientTransformationExtraArgs:
  r"""CR-MOGM: an EMA of the weights of any aggregator of this module.

  At each step the wrapped aggregator chooses its weights :math:`\hat\lambda_t`
  from the current gradients (or its EMAs); this applies

  .. math:: \lambda_t = \gamma \lambda_{t-1} + (1 - \gamma) \hat\lambda_t,
    \qquad d = \sum_i \lambda_{t,i} g_i,

  with :math:`\gamma` = ``weights_decay`` and :math:`\lambda_1 = \hat\lambda_1`. Smoothing the
  weights rather than the gradients (as ``ema_decay`` does) is what the paper
  proves convergent for stochastic MGDA-type methods; the paper's schedule
  raises :math:`\gamma` toward 1 as the learning rate decays, which
  ``optax.inject_hyperparams`` can drive. The wrapped aggregator's own direction
  is not used (``jit`` removes it). A step whose gradients are not finite leaves
  :math:`\lambda` unchanged and returns NaN, as every aggregator here.

  Args:
    inner: an aggregator of :mod:`bloop_optax.aggregators` (its state an
      :class:`AggregatorState`).
    weights_decay: :math:`\gamma \in [0, 1]`, the weight on the old average of
      the weights (0: the wrapped aggregator itself).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` on the same tuple of gradients;
    its state is a :class:`SmoothedWeightsState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.cr_mogm(aggregators.mgda(2), weights_decay=0.5)
    >>> state = tx.init(jnp.zeros(2))
    >>> e1, e2 = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])
    >>> _, state = tx.update((e1, 3 * e2), state)  # MGDA: 0.9, 0.1
    >>> d, state = tx.update((e1, e2), state)  # MGDA: 0.5, 0.5
    >>> state.objective_weights.round(6)  # (0.9, 0.1) / 2 + (0.5, 0.5) / 2
    Array([0.7, 0.3], dtype=float32)

  References:
    Zhou, Zhang, Jiang, Zhang, Fan, "On the Convergence of Stochastic
    Multi-Objective Gradient Manipulation and Beyond", NeurIPS 2022.
  """
  api = "aggregators.cr_mogm"
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(
      f"{api}: expected inner to be an aggregator of bloop_optax.aggregators (an optax"
      f" GradientTransformation); got {type(inner).__name__}."
    )
  _checks.check_number(weights_decay, "weights_decay", api, "in [0, 1]", lambda v: 0 <= v <= 1)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    inner_state = inner.init(params)
    if not isinstance(inner_state, AggregatorState):
      raise TypeError(
        f"{api}: expected inner to be an aggregator of bloop_optax.aggregators, whose state"
        f" is an AggregatorState holding the weights it chose; got a transform whose state is"
        f" {type(inner_state).__name__}. Wrap mgda(K), upgrad(K), ... instead."
      )
    return SmoothedWeightsState(inner_state, inner_state.objective_weights)

  def update_fn(updates, state, params=None, **extra):
    k = state.objective_weights.shape[0]
    _, inner_state = inner.update(updates, state.inner, params, **extra)
    chosen = inner_state.objective_weights
    finite = jnp.all(jnp.isfinite(chosen))
    first = state.inner.steps == state.inner.skipped_steps  # no weights chosen before
    gamma = jnp.asarray(weights_decay, jnp.float32)
    smoothed = jnp.where(first, chosen, gamma * state.objective_weights + (1 - gamma) * chosen)
    kept = jnp.where(finite, smoothed, state.objective_weights)
    grads = _pair.split_objectives_checked(updates, k, api)
    applied = jnp.where(finite, kept, jnp.nan)
    direction = tm.linear_combination(list(applied), grads)
    return direction, SmoothedWeightsState(inner_state, kept)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
