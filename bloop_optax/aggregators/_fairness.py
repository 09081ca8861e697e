"""Bargaining and fairness rules: Nash-MTL and FairGrad (alpha-fair utilities)."""

from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import optax

from bloop_optax import _checks
from bloop_optax import _qp
from bloop_optax.aggregators._base import _aggregator
from bloop_optax.aggregators._base import _check_count
from bloop_optax.aggregators._linalg import _cosines
from bloop_optax.aggregators._linalg import _normalized

# Damped Newton iterations of the alpha-fair problem (Nash-MTL, FairGrad). From
# the start below, well-posed problems converge in under 10 and the ridge's
# degenerate directions (opposite or zero gradients) grow geometrically to
# their size in under 25 (tests check the residual of the defining equation).
FAIR_NEWTON_STEPS = 40
# The iterations stop once a step moves every weight by at most this many units
# of its last place (float epsilon times the weight): converged to rounding.
FAIR_STOP_ULPS = 4


def _alpha_fair(a: jax.Array, p: jax.Array, *, count: bool = False) -> Any:
  r"""The :math:`w > 0` with :math:`A w = w^{-p}` (:math:`A` positive definite, :math:`p > 0`).

  It is the unique minimiser of the strictly convex
  :math:`f(w) = w^\top A w / 2 - \sum_i \phi(w_i)` with :math:`\phi' = w^{-p}`
  (:math:`\phi = \log` for :math:`p = 1`). Newton steps, each the full step once
  the Newton decrement is below 0.1 and otherwise the longest of
  :math:`1, 1/2, \ldots, 2^{-30}` that stays positive and decreases :math:`f` by a
  quarter of the predicted amount (Armijo); no host round trip. At most
  ``FAIR_NEWTON_STEPS`` steps: the loop stops after a step that moves every
  weight by at most ``FAIR_STOP_ULPS`` units of its last place, from where the
  iterates are fixed up to rounding (a step that finds no decrease moves
  nothing, and so would every later one). A relative test per weight, not one
  against the largest weight: the ridge's degenerate directions start many
  orders of magnitude below the others and grow by a factor per step. Where
  rounding, magnified by a nearly singular Hessian, keeps moving the weights
  by more, all the steps are taken.
  ``count``: also return the number of steps taken.
  """
  dtype = a.dtype
  near_log = jnp.abs(1 - p) < 1e-6
  q = jnp.where(near_log, 2.0, 1 - p)  # 1 - p, kept away from 0

  def f(w):
    phi = jnp.where(near_log, jnp.log(w), (w**q - 1) / q)
    return 0.5 * w @ (a @ w) - jnp.sum(phi)

  steps = jnp.exp2(-jnp.arange(31, dtype=dtype))

  def body(carry):
    i, w, _ = carry
    grad = a @ w - w ** (-p)
    hess = a + jnp.diag(p * w ** (-p - 1))
    step = -(_qp.pinv_symmetric(hess) @ grad)
    decrement = -(grad @ step)  # Newton decrement squared
    trial = w[None, :] + steps[:, None] * step[None, :]
    inside = jnp.all(trial > 0, axis=1)
    values = jax.vmap(f)(jnp.where(inside[:, None], trial, 1))
    good = inside & (values <= f(w) - 0.25 * steps * decrement)
    t = jnp.where((decrement < 0.01) & inside[0], 1, jnp.max(jnp.where(good, steps, 0)))
    move = t * step
    return i + 1, w + move, jnp.all(jnp.abs(move) <= FAIR_STOP_ULPS * jnp.finfo(dtype).eps * w)

  def again(carry):
    i, _, converged = carry
    return (i < FAIR_NEWTON_STEPS) & ~converged

  w0 = jnp.diag(a) ** (-1 / (1 + p))  # exact for orthogonal gradients
  start = (jnp.zeros([], jnp.int32), w0.astype(dtype), jnp.zeros([], bool))
  taken, w, _ = lax.while_loop(again, body, start)
  return (w, taken) if count else w


def _nash_mtl(gram: jax.Array, max_norm: Any, ridge: Any) -> jax.Array:
  """Nash-MTL's weights for the vectors whose Gram matrix is ``gram`` (any scale)."""
  k = gram.shape[0]
  dtype = gram.dtype
  g = _normalized(gram)
  cosines, inv, live = _cosines(g)
  a = cosines + jnp.asarray(ridge, dtype) * jnp.eye(k, dtype=dtype)
  unit = _alpha_fair(a, jnp.ones([], dtype))
  unit = jnp.where(live, unit, 0)
  length = jnp.sqrt(jnp.maximum(unit @ cosines @ unit, 0))  # |d|: ~sqrt(K)
  if max_norm is not None:
    cap = jnp.asarray(max_norm, dtype)
    unit = unit * jnp.where(length > cap, cap / jnp.where(length > 0, length, 1), 1)
  # Back to the given scale: w_i = unit_i / |g_i|.
  top = jnp.max(jnp.diag(gram))
  return unit * inv * jax.lax.rsqrt(jnp.where(top > 0, top, 1).astype(dtype))


def nash_mtl_weights(
  gram: jax.Array,
  *,
  max_norm: jax.typing.ArrayLike | None = 1.0,
  ridge: jax.typing.ArrayLike = 1e-6,
) -> jax.Array:
  r"""Nash-MTL: the bargaining solution :math:`G w = 1 / w`.

  The weights :math:`w > 0` with :math:`w_i \langle g_i, d\rangle = 1` for every
  :math:`i` (:math:`d = \sum_i w_i g_i`): the direction maximising
  :math:`\sum_i \log \langle g_i, d\rangle` over the ball. The solution depends
  only on the gradients' directions (scaling :math:`g_i` by :math:`c > 0` divides
  :math:`w_i` by :math:`c` and leaves :math:`d` unchanged) and
  :math:`\|d\| = \sqrt{K}`, so it is solved on the cosine matrix :math:`C`:
  :math:`(C + \epsilon I) u = 1 / u`, :math:`w_i = u_i / \|g_i\|`, by damped Newton
  steps on a strictly convex problem (a fixed budget, to float rounding on
  well-posed problems). The ridge :math:`\epsilon` (``ridge``) makes every case
  solvable: where 0 lies in the hull of the gradients' directions (two opposite
  gradients) :math:`G w = 1/w` has no solution, and the ridge's solution cancels
  the conflicting gradients (opposite gradients give :math:`d = 0`, and add
  nothing next to other gradients); it moves :math:`d` by about
  :math:`\epsilon` relative elsewhere. A zero gradient gets weight 0. Finally
  :math:`w` is scaled so that :math:`\|d\| \le` ``max_norm`` (``None``: no cap),
  as the authors' code clips the gradient's norm (default 1).
  """
  return _nash_mtl(gram, max_norm, ridge)


def _fairgrad(gram: jax.Array, alpha: Any, ridge: Any, log2_scale: Any = 0) -> jax.Array:
  """FairGrad's weights for the Gram matrix ``gram * 4**log2_scale``."""
  k = gram.shape[0]
  dtype = gram.dtype
  alpha = jnp.asarray(alpha, dtype)
  fair = alpha > 0
  p = 1 / jnp.where(fair, alpha, 1)
  top = jnp.max(jnp.diag(gram))
  top = jnp.where(top > 0, top, 1)
  a = gram / top + jnp.asarray(ridge, dtype) * jnp.eye(k, dtype=dtype)
  unit = _alpha_fair(a, p)
  # (c A) w = w^-p  <=>  w = c^(-1 / (1 + p)) u  for  A u = u^-p.
  scale = jnp.exp2(-(jnp.log2(top) + 2 * jnp.asarray(log2_scale, dtype)) / (1 + p))
  return jnp.where(fair, unit * scale, jnp.full([k], 1 / k, dtype))


def fairgrad_weights(
  gram: jax.Array, alpha: jax.typing.ArrayLike, *, ridge: jax.typing.ArrayLike = 1e-6
) -> jax.Array:
  r"""FairGrad: :math:`\alpha`-fair weights, :math:`G w = w^{-1/\alpha}`.

  The weights :math:`w > 0` with :math:`\langle g_i, d\rangle = w_i^{-1/\alpha}`:
  the direction maximising :math:`\sum_i \langle g_i, d\rangle^{1-\alpha} / (1 - \alpha)`.
  :math:`\alpha = 1` is Nash-MTL's proportional fairness (without its normalisation),
  larger :math:`\alpha` favours the worst-off objective more (toward max-min
  fairness); :math:`\alpha = 0` gives the mean, as TorchJD. Solved on
  :math:`G / \max_i G_{ii} + \epsilon I` by damped Newton steps on a strictly convex
  problem (as :func:`nash_mtl_weights`; ``ridge`` is :math:`\epsilon`, which makes the
  opposite and zero cases solvable and cancels opposite gradients), then rescaled:
  :math:`w` is homogeneous of degree :math:`-\alpha / (1 + \alpha)` in :math:`G`.
  """
  return _fairgrad(gram, alpha, ridge)


def nash_mtl(
  num_objectives: int,
  *,
  max_norm: jax.typing.ArrayLike | None = 1.0,
  ridge: jax.typing.ArrayLike = 1e-6,
  ema_decay: jax.typing.ArrayLike | None = None,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Nash-MTL: the gradients combined as a bargaining game.

  The weights solve :math:`G w = 1 / w`: every objective's gain
  :math:`\langle g_i, d\rangle` is inversely proportional to its weight, the
  Nash bargaining solution (see :func:`nash_mtl_weights`). The direction depends
  only on the gradients' directions and has norm :math:`\sqrt{K}`, capped at
  ``max_norm`` (the authors' clipping, default 1). The authors and TorchJD
  approximate the solution with at most 20 convex sub-problems warm-started
  from the previous step; here it is solved to float rounding every step
  (damped Newton, a fixed budget, inside ``jit``), so there is no state
  between steps but the optional EMAs.

  Args:
    num_objectives: the number :math:`K` of objectives.
    max_norm: cap on :math:`\|d\|` (``None``: none, :math:`\|d\| = \sqrt{K}`).
    ridge: :math:`\epsilon` added to the cosine matrix's diagonal, which makes
      opposite gradients cancel instead of having no solution.
    ema_decay: ``None`` (default) or :math:`\beta`: decide the weights from the EMAs'
      Gram matrix, as in :func:`mgda`; they are applied to the current
      gradients, so :math:`\|d\|` is then not exactly :math:`\sqrt{K}` (the cap holds
      for the EMAs' combination).
    accumulator_dtype: dtype of the EMAs.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; see :func:`mgda`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.nash_mtl(2, max_norm=None)
    >>> g1, g2 = jnp.array([3.0, 0.0]), jnp.array([0.0, 0.5])
    >>> d, _ = tx.update((g1, g2), tx.init(g1))
    >>> d.round(5)  # the two unit gradients: <g_i, d> w_i = 1
    Array([1., 1.], dtype=float32)

  References:
    Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya, "Multi-Task
    Learning as a Bargaining Game", ICML 2022 (arXiv:2202.01017).
  """
  api = "aggregators.nash_mtl"
  if max_norm is not None:
    _checks.check_number(max_norm, "max_norm", api, "a number > 0 or None", lambda v: v > 0)
  _checks.check_number(ridge, "ridge", api, "a number >= 0", lambda v: v >= 0)
  k = _check_count(num_objectives, api)

  def rule(gram, log2_scale, key, rule_state):
    w = _nash_mtl(gram, max_norm, ridge)
    return jnp.ldexp(w, -log2_scale.astype(jnp.int32)), rule_state

  return _aggregator(api, k, rule, ema_decay, accumulator_dtype)


def fairgrad(
  num_objectives: int,
  alpha: jax.typing.ArrayLike,
  *,
  ridge: jax.typing.ArrayLike = 1e-6,
  ema_decay: jax.typing.ArrayLike | None = None,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""FairGrad: :math:`\alpha`-fair weights, :math:`G w = w^{-1/\alpha}`.

  Each objective's gain :math:`\langle g_i, d\rangle` is :math:`w_i^{-1/\alpha}`: the
  direction maximises the :math:`\alpha`-fair utility of the gains (see
  :func:`fairgrad_weights`). :math:`\alpha = 1` is proportional fairness
  (Nash-MTL's solution without its normalisation), larger :math:`\alpha` moves
  toward max-min fairness, :math:`\alpha = 0` is the mean. The authors and
  TorchJD solve the same equation with SciPy's ``least_squares`` on the host;
  here damped Newton inside ``jit``, to float rounding.

  Args:
    num_objectives: the number :math:`K` of objectives.
    alpha: :math:`\alpha \ge 0` (the authors use 0.5 to 10; 2 on most of their tasks).
    ridge: :math:`\epsilon` added to the diagonal of :math:`G / \max_i G_{ii}`, which
      makes opposite gradients cancel instead of having no solution.
    ema_decay: ``None`` (default) or :math:`\beta`: decide the weights from the EMAs'
      Gram matrix, as in :func:`mgda`.
    accumulator_dtype: dtype of the EMAs.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; see :func:`mgda`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.fairgrad(2, alpha=1.0)
    >>> g1, g2 = jnp.array([2.0, 0.0]), jnp.array([0.0, 1.0])
    >>> d, state = tx.update((g1, g2), tx.init(g1))
    >>> state.objective_weights.round(5)  # w_i |g_i|^2 = 1 / w_i
    Array([0.5, 1. ], dtype=float32)

  References:
    Ban, Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024
    (arXiv:2402.15638).
  """
  api = "aggregators.fairgrad"
  _checks.check_number(alpha, "alpha", api, "a number >= 0", lambda v: v >= 0)
  _checks.check_number(ridge, "ridge", api, "a number >= 0", lambda v: v >= 0)

  def rule(gram, log2_scale, key, rule_state):
    return _fairgrad(gram, alpha, ridge, log2_scale), rule_state

  return _aggregator(api, num_objectives, rule, ema_decay, accumulator_dtype)
