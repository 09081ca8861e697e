r"""Priority-Constrained Descent: follow the primary gradient as closely as
possible while every secondary objective keeps a fraction of its progress.

References:
  Varam, AlHajri. "Not All Objectives Are Born Equal: Priority-Constrained
  Descent for Hierarchical Multi-Objective Optimization". TMLR 2026.
  arXiv:2606.29521.
"""

from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bloop_optax import _checks
from bloop_optax import _qp
from bloop_optax.aggregators._base import _aggregator
from bloop_optax.aggregators._base import _check_count

PyTree = Any


class PCDNorms(NamedTuple):
  r"""PCD's moving average of the squared gradient norms, in
  :class:`~bloop_optax.aggregators.AggregatorState`'s ``rule_state``.

  Attributes:
    sq_norm_ema: ``[K]``, the (not yet bias-corrected) EMA of
      :math:`\|g_i\|^2` divided by :math:`4^{e}`.
    exponent: int32 :math:`e`, a common power of 4 that keeps the EMA inside
      its dtype's range for any gradient norm. The EMA is float32 (float64 with
      ``jax_enable_x64``).
    count: int32, the finite steps averaged so far (for the bias correction).
  """

  sq_norm_ema: jax.Array
  exponent: jax.Array
  count: jax.Array


def _taus(tau: Any, k: int, api: str) -> jax.Array:
  """``tau`` as a float ``[K - 1]`` vector, or raises."""
  in_unit = lambda v: 0 <= v <= 1
  if isinstance(tau, (Sequence, np.ndarray)) and not isinstance(tau, str):
    values = list(np.asarray(tau, dtype=object).ravel()) if np.ndim(tau) else [tau]
    if len(values) != k - 1:
      raise ValueError(
        f"{api}: expected tau to be one number, or one per secondary objective"
        f" ({k - 1} for num_objectives={k}); got {len(values)} values."
      )
    for i, v in enumerate(values):
      _checks.check_number(v, f"tau[{i}]", api, "a number in [0, 1]", in_unit)
    return jnp.asarray(np.asarray(tau, dtype=float).reshape(k - 1))
  _checks.check_number(tau, "tau", api, "a number in [0, 1] (or one per secondary)", in_unit)
  tau = jnp.asarray(tau, jnp.result_type(float))
  return jnp.broadcast_to(tau, (k - 1,)) if tau.ndim == 0 else tau


def _dual_active_set(gs: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  r"""Goldfarb and Idnani's dual active-set method for PCD's program, on the
  Gram matrix ``gs`` of the (normalised) aux gradients.

  The iterate keeps :math:`d = \tilde g_1 + \sum_j \mu_j \tilde g_j` and adds one violated
  constraint ``p`` at a time (slack :math:`(G_s \mu - b)_p < 0`): along the part of
  :math:`\tilde g_p` orthogonal to the active gradients, dropping an active constraint first
  when its multiplier would turn negative. A gradient in the span of the active ones (no
  orthogonal part) only exchanges multipliers, so dependent aux gradients (more objectives
  than parameters, repeats) are handled exactly, where a primal active set on the singular
  dual cycles. Neither step exists exactly when the constraints cannot all hold.

  Returns ``(mu, feasible)``.
  """
  n = gs.shape[0]
  dtype = gs.dtype
  eps = jnp.finfo(dtype).eps
  atol = jnp.maximum(1e-9, 10 * eps) * jnp.maximum(jnp.max(jnp.diag(gs)), jnp.finfo(dtype).tiny)
  dependence = jnp.maximum(1e-9, 10 * eps)
  eye = jnp.eye(n, dtype=bool)
  inf = jnp.asarray(jnp.inf, dtype)

  def body(carry):
    mu, active, p, it, status = carry
    slacks = jnp.where(active, 0, gs @ mu - b)
    choose = p < 0  # the last constraint was added: pick the most violated one
    p_new = jnp.argmin(slacks)
    optimal = choose & (slacks[p_new] >= -atol)
    p = jnp.where(choose, p_new, p)
    # The dual step: +1 on mu_p, -r on the active multipliers, with
    # r = Gs[A, A]^-1 Gs[A, p] (the active block padded with the identity).
    both = active[:, None] & active[None, :]
    # the block is symmetric positive definite (the active gradients are independent);
    # the pseudo-inverse from eigh, as the other active sets use, needs no scatter
    r = _qp.pinv_symmetric(jnp.where(both, gs, eye.astype(dtype))) @ jnp.where(active, gs[:, p], 0)
    r = jnp.where(active, r, 0)
    z_sq = gs[p, p] - gs[p] @ r
    ratios = jnp.where(active & (r > 0), mu / jnp.where(r > 0, r, 1), inf)
    k = jnp.argmin(ratios)
    partial = ratios[k]
    slack_p = gs[p] @ mu - b[p]
    independent = z_sq > dependence * gs[p, p]
    full = jnp.where(independent, -slack_p / jnp.where(independent, z_sq, 1), inf)
    step = jnp.minimum(partial, full)
    stuck = ~optimal & jnp.isinf(step)
    take = jnp.where(jnp.isinf(step), 0, step)
    moved = mu - take * r + jnp.where(eye[p], take, 0)  # no scatter: explicit meshes
    add = full <= partial
    new_active = jnp.where(add, active | eye[p], active & ~eye[k])
    moved = jnp.where(add | ~eye[k], moved, 0)
    keep = optimal | stuck
    status = jnp.where(optimal, 1, jnp.where(stuck, 2, 0))
    return (
      jnp.where(keep, mu, moved),
      jnp.where(keep, active, new_active),
      jnp.where(add | keep, -1, p),
      it + 1,
      status,
    )

  def cond(carry):
    return (carry[4] == 0) & (carry[3] < 10 * n + 10)

  # Zeros like b, not fresh ones: on an explicit mesh the loop's vectors then
  # carry the Gram matrix's (replicated) sharding, which products with it need.
  start = (
    jnp.zeros_like(b),
    jnp.zeros_like(b, dtype=bool),
    jnp.asarray(-1),
    jnp.asarray(0),
    jnp.asarray(0),
  )
  mu, _, _, _, status = jax.lax.while_loop(cond, body, start)
  return jnp.maximum(mu, 0), status != 2


def _multipliers(gt: jax.Array, taus: jax.Array) -> jax.Array:
  r"""``[1, mu_2, ..., mu_K]``: :math:`\tilde d = \tilde g_1 + \sum_j \mu_j \tilde g_j` solves
  PCD's program on the normalised Gram matrix ``gt``; ``[1, 0, ...]`` when the
  constraints cannot all hold."""
  k = gt.shape[0]
  one = jnp.ones([1], gt.dtype)
  if k == 1:
    return one
  gs = gt[1:, 1:]
  # Dual: min_{mu >= 0} mu^T Gs mu / 2 - b^T mu; b_j > 0 iff g_1 breaks constraint j.
  b = taus.astype(gt.dtype) * jnp.diag(gs) - gt[1:, 0]
  if k == 2:  # the closed form: one constraint, active iff g_1 breaks it
    norm2 = gs[0, 0]
    mu = jnp.where((b > 0) & (norm2 > 0), b / jnp.where(norm2 > 0, norm2, 1), 0)
    return jnp.concatenate([one, mu])
  mu, feasible = _dual_active_set(gs, b)
  return jnp.concatenate([one, jnp.where(feasible, mu, 0)])


def pcd_weights(
  gram: jax.Array, scales: jax.Array, *, tau: jax.typing.ArrayLike = 0.02
) -> jax.Array:
  r"""PCD's weights on the raw gradients, :math:`d = \sum_i w_i g_i`.

  With :math:`s` = ``scales`` (:math:`s_i = 1 / \sqrt{\hat v_i + \epsilon}` in
  :func:`~bloop_optax.pcd`) and the normalised gradients :math:`\tilde g_i = s_i g_i`, the
  first of which is the primary objective's:

  .. math::

    \tilde d = \operatorname*{argmin}_d \tfrac12 \|d - \tilde g_1\|^2 \quad \text{s.t.}
    \quad \tilde g_j^\top d \ge \tau_j \|\tilde g_j\|^2, \ j = 2, \ldots, K,

  and :math:`d = \tilde d \, \|g_1\| / \|\tilde d\|`. In Gram terms
  :math:`\tilde d = \tilde g_1 + \sum_j \mu_j \tilde g_j` with the multipliers :math:`\mu \ge 0`
  of the constraints, found from :math:`\tilde G = G \circ s s^\top` (in closed form for
  :math:`K = 2`, by the exact active-set solver otherwise). Special cases: :math:`g_1 = 0` or
  :math:`\tilde d = 0` (to the Gram matrix's rounding) gives :math:`w = 0`; constraints that
  cannot all hold are dropped (:math:`w = (1, 0, \ldots)`, :math:`d = g_1`).

  Args:
    gram: ``[K, K]`` Gram matrix, the primary objective first.
    scales: ``[K]`` normalising scales :math:`s_i \ge 0`.
    tau: :math:`\tau \in [0, 1]`, one number or one per secondary objective.

  Returns:
    ``[K]`` weights.
  """
  gram = jnp.asarray(gram)
  k = gram.shape[0]
  return _weights(gram, jnp.asarray(scales, gram.dtype), jnp.broadcast_to(tau, (k - 1,)), 0)


def _weights(gram, u, taus, shift):
  """:func:`pcd_weights` with the normalised Gram matrix ``G u u^T 4**shift``
  and ``||g_1|| / ||d~||`` computed without leaving the dtype's range."""
  gt = jnp.ldexp(gram * jnp.outer(u, u), 2 * shift)
  w = _multipliers(gt, taus)
  d_sq = w @ gt @ w
  magnitude = (jnp.abs(w) @ jnp.sqrt(jnp.maximum(jnp.diag(gt), 0))) ** 2
  moves = (gram[0, 0] > 0) & (d_sq > 10 * jnp.finfo(gram.dtype).eps * magnitude)
  ratio = jnp.sqrt(gram[0, 0] / jnp.where(moves, d_sq, 1))  # ||g_1|| / ||d~||, over 2**shift
  return jnp.where(moves, w * u * jnp.ldexp(ratio, shift), 0)


def pcd(
  tau: jax.typing.ArrayLike | Sequence[float] = 0.02,
  *,
  num_objectives: int = 2,
  norm_decay: jax.typing.ArrayLike = 0.999,
  eps: jax.typing.ArrayLike = 1e-8,
  ema_decay: jax.typing.ArrayLike | None = None,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Priority-Constrained Descent (PCD) on the ``(main, aux)`` pair, or on
  ``(main, aux_1, ..., aux_{K-1})``.

  With the main (primary) gradient :math:`g_1`, the aux (secondary) gradients :math:`g_j`, and
  the normalised gradients :math:`\tilde g_i = s_i g_i`, :math:`s_i = 1/\sqrt{\hat v_i +
  \epsilon}`, where :math:`\hat v_i` is the bias-corrected EMA (weight ``norm_decay`` on the old
  average) of :math:`\|g_i\|^2` kept in the state:

  .. math::

    \tilde d = \operatorname*{argmin}_d \tfrac12 \|d - \tilde g_1\|^2 \quad \text{s.t.}
    \quad \tilde g_j^\top d \ge \tau \|\tilde g_j\|^2 \ \text{for every aux } j,
    \qquad D = \tilde d \, \frac{\|g_1\|}{\|\tilde d\|}.

  So every aux objective keeps at least the fraction :math:`\tau` of the first-order progress
  a step along its own normalised gradient would give, and the step otherwise follows the
  main gradient, with its norm. Where Bloop guarantees the main loss its first-order progress
  whatever :math:`\lambda`, PCD guarantees the aux losses theirs; and where Bloop's
  :math:`\lambda` has the units of the losses' ratio, :math:`\tau` is a scale-free fraction:
  multiplying an aux loss by a constant leaves the direction unchanged (up to :math:`\epsilon`),
  and multiplying the main loss scales it.

  Special cases: :math:`g_1 = 0` gives :math:`D = 0`; constraints that cannot all hold (three
  or more objectives, e.g. anti-parallel aux gradients) are dropped and :math:`D = g_1`; a step
  whose gradients hold a NaN or an Inf returns NaN, leaves the state's averages untouched and
  is counted in ``skipped_steps``. Only the :math:`K \times K` Gram matrix of global inner
  products is read (scalars across devices): the program is solved in closed form for one aux
  loss and exactly by an active-set method inside ``jit`` for more; huge finite gradients
  (norms above 1e19) give the exact direction.

  Args:
    tau: :math:`\tau \in [0, 1]`, a number (or a schedule through
      ``optax.inject_hyperparams``), or one per aux loss.
    num_objectives: :math:`K`, 2 for the pair (``update`` takes ``MainAux(main, aux)``), or
      more for the tuple ``(main, aux_1, ..., aux_{K-1})`` in which the main gradient comes
      first (what :func:`bloop_optax.value_and_grads` returns for K losses).
    norm_decay: :math:`\beta \in [0, 1)`, the weight on the old average of the squared norms.
    eps: :math:`\epsilon \ge 0` added to :math:`\hat v_i`.
    ema_decay: ``None`` (the method as published), or decide from EMAs of the gradients with
      this weight on the old average, as every aggregator of :mod:`bloop_optax.aggregators`
      can; the direction still combines the current gradients.
    accumulator_dtype: dtype of the gradient EMAs (``ema_decay`` only).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its state is an
    :class:`~bloop_optax.aggregators.AggregatorState` whose ``objective_weights`` are the
    last step's :math:`w` (:math:`D = \sum_i w_i g_i`) and whose ``rule_state`` is a
    :class:`PCDNorms`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> import bloop_optax
    >>> tx = bloop_optax.pcd(tau=0.5)
    >>> grads = bloop_optax.MainAux(jnp.array([1.0, 0.0]), jnp.array([-1.0, 1.0]))
    >>> d, state = tx.update(grads, tx.init(jnp.zeros(2)))
    >>> np.asarray(d).round(4)  # |d| = |main|; the aux keeps half its normalised progress
    array([0.1691, 0.9856], dtype=float32)
    >>> np.asarray(state.objective_weights).round(4)  # d = w_main main + w_aux aux
    array([1.1547, 0.9856], dtype=float32)

  References:
    Varam, AlHajri, "Not All Objectives Are Born Equal: Priority-Constrained
    Descent for Hierarchical Multi-Objective Optimization", TMLR 2026
    (arXiv:2606.29521).
  """
  api = "pcd"
  k = _check_count(num_objectives, api)
  if k < 2:
    raise ValueError(f"{api}: expected num_objectives >= 2 (the main loss and an aux); got {k}.")
  taus = _taus(tau, k, api)
  _checks.check_number(norm_decay, "norm_decay", api, "a number in [0, 1)", lambda v: 0 <= v < 1)
  _checks.check_number(eps, "eps", api, "a number >= 0", lambda v: v >= 0)
  dtype = jnp.result_type(float)  # float32, or float64 under jax_enable_x64
  start = PCDNorms(
    sq_norm_ema=jnp.zeros([k], dtype),
    exponent=jnp.zeros([], jnp.int32),
    count=jnp.zeros([], jnp.int32),
  )

  def rule(gram, log2_scale, key, norms):
    del key
    m = jnp.asarray(log2_scale, jnp.int32)  # the true Gram matrix is gram * 4**m
    work = jnp.promote_types(gram.dtype, dtype)
    gram = gram.astype(work)
    beta = jnp.asarray(norm_decay, work)
    # The EMA of the squared norms over a common power of 4, renormalised so
    # its largest entry stays near 1 whatever the gradients' scale.
    common = jnp.maximum(norms.exponent, m)
    diag = jnp.diag(gram)
    ema = beta * jnp.ldexp(norms.sq_norm_ema.astype(work), 2 * (norms.exponent - common)) + (
      1 - beta
    ) * jnp.ldexp(diag, 2 * (m - common))
    top = jnp.max(ema)
    shift = jnp.where(top > 0, jnp.frexp(jnp.where(top > 0, top, 1))[1] // 2, 0)
    ema, exponent = jnp.ldexp(ema, -2 * shift), common + shift
    count = norms.count + 1
    v_hat = ema / (1 - beta ** count.astype(work))
    denom = jnp.sqrt(v_hat + jnp.ldexp(jnp.asarray(eps, work), -2 * exponent))
    u = jnp.where(denom > 0, 1 / jnp.where(denom > 0, denom, 1), 0)
    # s_i = u_i 2**-exponent, so G~ = gram u u^T 4**(m - exponent).
    weights = _weights(gram, u, taus.astype(work), m - exponent)
    return weights, PCDNorms(ema.astype(dtype), exponent, count)

  inner = _aggregator(api, k, rule, ema_decay, accumulator_dtype, rule_state=start)
  if k > 2:
    return inner

  def update_fn(updates, state, params=None, **extra):
    return inner.update(tuple(_checks.check_pair(updates, api)), state, params, **extra)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
