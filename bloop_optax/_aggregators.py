r"""Multi-objective gradient aggregators computed from the Gram matrix.

For K objectives of equal standing with gradients ``g_1 .. g_K``, each
aggregator returns :math:`d = \sum_i w_i g_i` with weights :math:`w` decided from the
K x K Gram matrix :math:`G_ij = \langle g_i, g_j\rangle` alone. The Gram matrix is K (K + 1) / 2
global inner products (per-leaf reductions summed; scalars cross devices), and
:math:`d` is one elementwise pass: the K x P Jacobian is never formed.

Optionally (``ema_decay``) the weights are decided from the Gram matrix of EMAs
of the K gradients and applied to the current gradients, as Bloop projects on
an EMA of the main gradient (Hsieh et al., ICML 2024, arXiv:2402.02998): a
decision taken on noisy mini-batch gradients is biased, one taken on their
averages much less.

Every weight rule but Nash-MTL's and FairGrad's is invariant to a global scale
of :math:`G` (checked per rule below), so the rules run on ``G / max_i G_ii``,
rebuilt exactly from rescaled inner products when the float32 sums overflow;
those two are told the power of 4 the Gram matrix was divided by and rescale
their weights by it.
"""

from collections.abc import Callable
import math
import numbers
from typing import Any
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from bloop_optax import _checks
from bloop_optax import _pair
from bloop_optax import _qp
from bloop_optax import _tree_math as tm

PyTree = Any


# ------------------------------------------------------------ weight rules


def _normalized(gram: jax.Array) -> jax.Array:
  """``G / max_i G_ii`` (:math:`G` itself when it is zero)."""
  top = jnp.max(jnp.diag(gram))
  return gram / jnp.where(top > 0, top, 1)


def mean_weights(gram: jax.Array) -> jax.Array:
  """:math:`w_i = 1 / K`: the average of the gradients."""
  k = gram.shape[0]
  return jnp.full([k], 1 / k, gram.dtype)


def mgda_weights(gram: jax.Array) -> jax.Array:
  r"""MGDA: the weights of the min-norm point of the gradients' convex hull.

  .. math:: w = \arg\min_{w \ge 0,\ \sum_i w_i = 1} w^\top G w

  Solved exactly (an active-set method, see :mod:`bloop_optax.aggregators`);
  where the minimiser is not unique (collinear gradients) the direction
  :math:`\sum_i w_i g_i` still is. Scale: invariant.
  """
  return _qp.min_norm_simplex(_normalized(gram))


def pcgrad_weights(gram: jax.Array, orders: jax.Array) -> jax.Array:
  r"""PCGrad for K objectives, with the given visiting orders.

  For each :math:`i`, start from :math:`g_i` and visit
  :math:`j = orders[i, 0], \ldots, orders[i, K-1]` (skipping ``i``): whenever the current vector
  ``v`` has :math:`\langle v, g_j\rangle < 0`, replace it by
  :math:`v - \langle v, g_j\rangle / \langle g_j, g_j\rangle g_j`. Then :math:`d = \sum_i v_i` (a
  sum, as in the paper's Algorithm 1). In weights, each :math:`v_i = sum_j a_ij g_j` and
  :math:`\langle v_i, g_j\rangle = (G a_i)_j`. Scale: invariant.

  Args:
    gram: ``[K, K]``.
    orders: ``[K, K]`` int, row :math:`i` a permutation of ``0 .. K-1``.
  """
  g = _normalized(gram)
  k = g.shape[0]

  def one(i, order):
    a = (jnp.arange(k) == i).astype(g.dtype)
    for p in range(k):
      j = order[p]
      inner = g[j] @ a
      conflict = (j != i) & (inner < 0)
      step = jnp.where(conflict, -tm.ratio(inner, g[j, j]), 0)
      a = a + jnp.where(jnp.arange(k) == j, step, 0)  # one-hot, not a scatter
    return a

  return jnp.sum(jax.vmap(one)(jnp.arange(k), orders), axis=0)


def imtl_g_weights(gram: jax.Array) -> jax.Array:
  r"""IMTL-G: the combination whose projections on every unit gradient are equal.

  :math:`d = \sum_i w_i g_i` with :math:`\langle d, g_i / |g_i|\rangle` the same for every
  :math:`i` and :math:`\sum_i w_i = 1`: :math:`v = G^{+} n` with :math:`n_i = |g_i| = \sqrt{G_ii}`
  and :math:`w = v / sum(v)` (:math:`G^{+}` the pseudo-inverse, which extends the method to
  linearly dependent gradients); :math:`w = 0` when ``sum(v)`` vanishes (e.g.
  opposite gradients: no direction has equal positive projections).
  Scale: :math:`v` scales as :math:`1 / \sqrt{s}`, :math:`w` is invariant.
  """
  g = _normalized(gram)
  v = _qp.pinv_symmetric(g) @ jnp.sqrt(jnp.maximum(jnp.diag(g), 0))
  total = jnp.sum(v)
  alive = jnp.abs(total) > _qp._tolerance(g.dtype) * jnp.sum(jnp.abs(v))
  return jnp.where(alive, v / jnp.where(alive, total, 1), 0)


def aligned_mtl_weights(gram: jax.Array) -> jax.Array:
  r"""Aligned-MTL: the mean of the gradients made orthogonal and of equal norm.

  With :math:`G = V \operatorname{diag}(\lambda) V^T` restricted to its rank (eigenvalues above
  :math:`K \varepsilon \max \lambda`), the balance matrix
  :math:`B = \sqrt{\lambda_{\min}} V \operatorname{diag}(\lambda)^{-1/2} V^T` makes the rows of ``B
  J`` orthogonal with norm ``sqrt(λ_min)``; :math:`w = B 1 / K`. A zero :math:`G` gives
  :math:`w = 1 / K`. Scale: invariant.
  """
  g = _normalized(gram)
  k = g.shape[0]
  lam, vec = jnp.linalg.eigh(g)
  keep = lam > jnp.max(lam) * k * jnp.finfo(g.dtype).eps
  smallest = jnp.min(jnp.where(keep, lam, jnp.inf))
  inv_sqrt = jnp.where(keep, 1 / jnp.sqrt(jnp.where(keep, lam, 1)), 0)
  balance = jnp.sqrt(jnp.where(jnp.any(keep), smallest, 1)) * (vec * inv_sqrt) @ vec.T
  pref = jnp.full([k], 1 / k, g.dtype)
  return jnp.where(jnp.any(keep), jnp.sum(balance, axis=1) / k, pref)  # B 1 / K


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
  return jnp.sum(jax.vmap(lambda u: _onto_dual_cone(g, u))(units), axis=0)


def _onto_dual_cone(g: jax.Array, u: jax.Array) -> jax.Array:
  """Weights of the projection of ``J^T u`` onto the dual cone of the rows of
  ``J``: ``argmin_{v >= u} v^T G v``, i.e. ``u`` plus the nonnegative QP in
  ``x = v - u`` (quadratic ``G``, linear ``G u``). ``G u`` as a sum of
  products: older JAX refuses a matrix product between an array on an explicit
  mesh and a constant ``u``."""
  return u + _qp.nonneg(g, jnp.sum(g * u[None, :], axis=1))


def cagrad_weights(gram: jax.Array, c: jax.typing.ArrayLike = 0.5) -> jax.Array:
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
  it (``mantissa bits + 10`` halvings, each QP warm-started). When :math:`g_0 = 0`
  or :math:`c = 0`, :math:`d = g_0`. When :math:`g_w^* = 0` (0 on the hull's boundary, or
  :math:`c \ge 1`), :math:`d` is undefined; like the reference implementation of
  Jacobian descent (TorchJD), the weights are then 0. :math:`|g_w^*|` counts as 0
  below :math:`\sqrt{eps}` times the longest gradient. Scale: invariant.
  """
  g = _normalized(gram)
  k = g.shape[0]
  dtype = g.dtype
  mean = jnp.full([k], 1 / k, dtype)
  # Sums rather than products with the constant ``mean``: older JAX refuses a
  # matrix product between an array on an explicit mesh and a constant.
  gb = jnp.sum(g, axis=1) / k  # G 1 / K
  radius = jnp.asarray(c, dtype) * jnp.sqrt(jnp.maximum(jnp.sum(gb) / k, 0))  # c |g_0|
  longest = jnp.sqrt(jnp.max(jnp.diag(g)))
  live = radius > 0
  safe_radius = jnp.where(live, radius, 1)

  def h(t, x, free):
    x, free, _ = _qp.active_set(g, t * gb, x, free, simplex=True)
    return jnp.sqrt(jnp.maximum(x @ g @ x, 0)) - safe_radius * t, x, free

  x0 = _qp.min_norm_simplex(g)
  iters = jnp.finfo(dtype).nmant + 10

  def halve(_, carry):
    lo, hi, x, free = carry
    mid = (lo + hi) / 2
    value, x, free = h(mid, x, free)
    up = value >= 0
    return jnp.where(up, mid, lo), jnp.where(up, hi, mid), x, free

  hi0 = 2 * longest / safe_radius
  lo, hi, x, free = lax.fori_loop(0, iters, halve, (jnp.zeros([], dtype), hi0, x0, x0 > 0))
  _, x, _ = h((lo + hi) / 2, x, free)
  norm = jnp.sqrt(jnp.maximum(x @ g @ x, 0))
  at_zero = (lo == 0) | ~(norm > jnp.sqrt(jnp.finfo(dtype).eps) * longest)
  corrected = mean + safe_radius / jnp.where(at_zero, 1, norm) * x
  return jnp.where(live, jnp.where(at_zero, jnp.zeros_like(mean), corrected), mean)


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


def _cosines(g: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The cosine matrix of the vectors whose Gram matrix is ``g``, the inverse
  norms and which vectors are nonzero (a zero vector: cosines and inverse 0)."""
  norms = jnp.sqrt(jnp.maximum(jnp.diag(g), 0))
  live = norms > 0
  inv = jnp.where(live, 1 / jnp.where(live, norms, 1), 0)
  return g * inv[:, None] * inv[None, :], inv, live


def config_weights(gram: jax.Array) -> jax.Array:
  r"""ConFIG: one direction with the same cosine to every gradient.

  With unit gradients :math:`u_i = g_i / \|g_i\|` (zero for a zero gradient),
  :math:`\hat d \propto U^+ \mathbf{1}` (the least-norm vector with
  :math:`\langle \hat d, u_i\rangle` equal for all :math:`i`, through the pseudo-inverse),
  normalised, and scaled by the sum of the gradients' components along it:
  :math:`d = \big(\sum_i \langle g_i, \hat d\rangle\big) \hat d`. In Gram terms, with
  :math:`C` the cosine matrix and :math:`a = D^{-1} C^+ \mathbf{1}`
  (:math:`D = \operatorname{diag}(\|g_i\|)`),
  :math:`w = a \, (\mathbf{1}^T G a) / (a^T G a)`; :math:`w = 0` when :math:`a^T G a = 0`
  (e.g. two opposite gradients). Scale: invariant.
  """
  g = _normalized(gram)
  k = g.shape[0]
  cosines, inv, live = _cosines(g)
  a = inv * (_qp.pinv_symmetric(cosines) @ jnp.where(live, 1.0, 0.0).astype(g.dtype))
  length2 = a @ g @ a
  positive = length2 > jnp.finfo(g.dtype).eps * jnp.max(jnp.diag(g)) * k
  scale = jnp.sum(g @ a) / jnp.where(positive, length2, 1)
  return jnp.where(positive, scale * a, jnp.zeros([k], g.dtype))


def krum_weights(gram: jax.Array, n_byzantine: int = 0, n_selected: int = 1) -> jax.Array:
  r"""Krum: the mean of the gradients closest to their neighbours.

  Each gradient's score is the sum of its squared distances
  :math:`\|g_i - g_j\|^2 = G_{ii} + G_{jj} - 2 G_{ij}` to its
  :math:`K - f - 2` nearest other gradients (:math:`f` = ``n_byzantine``); the
  ``n_selected`` gradients with the lowest scores are averaged (Multi-Krum; ties
  go to the lower index). Needs :math:`K \ge f + 3`. Scale: invariant.
  """
  k = gram.shape[0]
  _check_krum(k, n_byzantine, n_selected, "aggregators.krum_weights")
  g = _normalized(gram)
  diag = jnp.diag(g)
  dist = jnp.maximum(diag[:, None] + diag[None, :] - 2 * g, 0)
  dist = jnp.where(jnp.eye(k, dtype=bool), jnp.inf, dist)
  nearest = jnp.sort(dist, axis=1)[:, : k - n_byzantine - 2]
  scores = jnp.sum(nearest, axis=1)
  # Each score's rank (ties to the lower index), by comparisons: no scatter,
  # which older JAX cannot partition on an explicit mesh.
  index = jnp.arange(k)
  before = (scores[None, :] < scores[:, None]) | (
    (scores[None, :] == scores[:, None]) & (index[None, :] < index[:, None])
  )
  rank = jnp.sum(before, axis=1)
  return jnp.where(rank < n_selected, 1 / n_selected, 0).astype(g.dtype)


def _check_krum(k: int, n_byzantine: Any, n_selected: Any, api: str) -> None:
  _checks.check_int(n_byzantine, "n_byzantine", api, "an int >= 0", lambda v: v >= 0)
  _checks.check_int(
    n_selected, "n_selected", api, f"an int in [1, K] (K = {k})", lambda v: 1 <= v <= k
  )
  if k < n_byzantine + 3:
    raise ValueError(
      f"{api}: Krum needs K >= n_byzantine + 3 gradients (each score sums the distances to"
      f" K - n_byzantine - 2 >= 1 neighbours); got K = {k} and n_byzantine = {n_byzantine}."
    )


def _onto_simplex(v: jax.Array) -> jax.Array:
  """Euclidean projection onto the probability simplex (sort, then the
  threshold; no gather or scatter, which older JAX cannot partition on an
  explicit mesh)."""
  k = v.shape[0]
  u = jnp.sort(v)[::-1]
  excess = jnp.cumsum(u) - 1
  index = jnp.arange(k)
  positive = u - excess / (index + 1).astype(v.dtype) > 0
  last = jnp.max(jnp.where(positive, index, 0))
  theta = jnp.sum(jnp.where(index == last, excess, 0)) / (last + 1).astype(v.dtype)
  return jnp.maximum(v - theta, 0)


def moco_weights(
  gram: jax.Array,
  weights: jax.Array,
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


def random_weights(gram: jax.Array, key: jax.Array) -> jax.Array:
  r"""Random loss weighting: :math:`w = \operatorname{softmax}(z)`, :math:`z \sim N(0, I_K)`.

  The weights ignore the gradients (the Gram matrix only sets :math:`K` and the
  dtype); a new draw every step from ``key``.
  """
  k = gram.shape[0]
  return jax.nn.softmax(jax.random.normal(key, [k], gram.dtype))


def constant_weights(gram: jax.Array, weights: jax.typing.ArrayLike) -> jax.Array:
  """The given weights, whatever the gradients: :math:`d = \\sum_i w_i g_i`."""
  return jnp.broadcast_to(jnp.asarray(weights, gram.dtype), gram.shape[:1])


def _orders(key: jax.Array, k: int) -> jax.Array:
  """``[K, K]`` visiting orders: row ``i`` a random permutation of ``0 .. K-1``."""
  return jax.vmap(lambda kk: jax.random.permutation(kk, k))(jax.random.split(key, k))


# Damped Newton iterations of the alpha-fair problem (Nash-MTL, FairGrad). From
# the start below, well-posed problems converge in under 10 and the ridge's
# degenerate directions (opposite or zero gradients) grow geometrically to
# their size in under 25 (tests check the residual of the defining equation).
FAIR_NEWTON_STEPS = 40


def _alpha_fair(a: jax.Array, p: jax.Array) -> jax.Array:
  r"""The :math:`w > 0` with :math:`A w = w^{-p}` (:math:`A` positive definite, :math:`p > 0`).

  It is the unique minimiser of the strictly convex
  :math:`f(w) = w^\top A w / 2 - \sum_i \phi(w_i)` with :math:`\phi' = w^{-p}`
  (:math:`\phi = \log` for :math:`p = 1`). Newton steps, each the full step once
  the Newton decrement is below 0.1 and otherwise the longest of
  :math:`1, 1/2, \ldots, 2^{-30}` that stays positive and decreases :math:`f` by a
  quarter of the predicted amount (Armijo); a fixed number of steps, no host
  round trip.
  """
  dtype = a.dtype
  near_log = jnp.abs(1 - p) < 1e-6
  q = jnp.where(near_log, 2.0, 1 - p)  # 1 - p, kept away from 0

  def f(w):
    phi = jnp.where(near_log, jnp.log(w), (w**q - 1) / q)
    return 0.5 * w @ (a @ w) - jnp.sum(phi)

  steps = jnp.exp2(-jnp.arange(31, dtype=dtype))

  def body(_, w):
    grad = a @ w - w ** (-p)
    hess = a + jnp.diag(p * w ** (-p - 1))
    step = -(_qp.pinv_symmetric(hess) @ grad)
    decrement = -(grad @ step)  # Newton decrement squared
    trial = w[None, :] + steps[:, None] * step[None, :]
    inside = jnp.all(trial > 0, axis=1)
    values = jax.vmap(f)(jnp.where(inside[:, None], trial, 1))
    good = inside & (values <= f(w) - 0.25 * steps * decrement)
    t = jnp.where((decrement < 0.01) & inside[0], 1, jnp.max(jnp.where(good, steps, 0)))
    return w + t * step

  w0 = jnp.diag(a) ** (-1 / (1 + p))  # exact for orthogonal gradients
  return lax.fori_loop(0, FAIR_NEWTON_STEPS, body, w0.astype(dtype))


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
  gram: jax.Array, alpha: jax.typing.ArrayLike, ridge: jax.typing.ArrayLike = 1e-6
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


def gradvac_weights(
  gram: jax.Array,
  targets: jax.Array,
  orders: jax.Array,
  target_decay: jax.typing.ArrayLike = 0.5,
) -> tuple[jax.Array, jax.Array]:
  r"""GradVac with the given cosine targets and visiting orders.

  For each :math:`i`, :math:`v_i` starts at :math:`g_i` and visits the other
  objectives :math:`j` in the order ``orders[i]`` (skipping ``i``). With
  :math:`\phi = \cos(v_i, g_j)` and the target :math:`\hat\phi_{ij}` (``targets[i, j]``), if
  :math:`\phi < \hat\phi_{ij}` it adds

  .. math::

    \frac{\|v_i\| \big(\hat\phi_{ij} \sqrt{1 - \phi^2} - \phi \sqrt{1 - \hat\phi_{ij}^2}\big)}
      {\|g_j\| \sqrt{1 - \hat\phi_{ij}^2}} \, g_j,

  which raises the cosine to :math:`\hat\phi_{ij}`; then the target moves toward the
  observed cosine, :math:`\hat\phi_{ij} \leftarrow \gamma \hat\phi_{ij} + (1 - \gamma) \phi`
  with :math:`\gamma` = ``target_decay``. :math:`d = \sum_i v_i` (a sum, as PCGrad).
  Cosines with a zero vector count as 0 and a division by zero as no correction
  (no :math:`\epsilon`). Scale: invariant.

  Args:
    gram: ``[K, K]``.
    targets: ``[K, K]`` cosine targets :math:`\hat\phi` (the diagonal is unused).
    orders: ``[K, K]`` int, row :math:`i` a permutation of ``0 .. K-1``.
    target_decay: the weight on the old target.

  Returns:
    ``(weights, new_targets)``.
  """
  g = _normalized(gram)
  k = g.shape[0]
  decay = jnp.asarray(target_decay, g.dtype)
  norms = jnp.sqrt(jnp.maximum(jnp.diag(g), 0))

  def one(i, order, row):
    a = (jnp.arange(k) == i).astype(g.dtype)
    for p in range(k):
      j = order[p]
      onehot = jnp.arange(k) == j
      other = j != i
      inner = g[j] @ a
      norm_v = jnp.sqrt(jnp.maximum(a @ g @ a, 0))
      phi = tm.ratio(inner, norm_v * norms[j])
      target = jnp.sum(jnp.where(onehot, row, 0))
      root_phi = jnp.sqrt(jnp.maximum(1 - phi * phi, 0))
      root_target = jnp.sqrt(jnp.maximum(1 - target * target, 0))
      den = norms[j] * root_target
      coef = norm_v * (target * root_phi - phi * root_target)
      add = other & (phi < target) & (den > 0)
      step = jnp.where(add, coef / jnp.where(den > 0, den, 1), 0)
      a = a + jnp.where(onehot, step, 0)  # one-hot, not a scatter
      row = jnp.where(onehot & other, decay * target + (1 - decay) * phi, row)
    return a, row

  rows, new_targets = jax.vmap(one)(jnp.arange(k), orders, targets.astype(g.dtype))
  return jnp.sum(rows, axis=0), new_targets


# ------------------------------------------------------------- transforms


class AggregatorState(NamedTuple):
  r"""State of the aggregators of :mod:`bloop_optax.aggregators`.

  Attributes:
    steps: int32 number of ``update`` calls.
    skipped_steps: int32 number of steps with a NaN or Inf in some gradient;
      those steps never entered ``grad_emas`` and gave NaN weights.
    grad_emas: the K EMAs of the gradients (accumulator dtype), or ``None``
      for ``ema_decay=None``.
    gram_cosines: float32 ``[K, K]`` cosines of the Gram matrix the weights
      were decided from at the last step (the gradients', or with
      ``ema_decay`` their EMAs'); 0 where a vector is zero.
    objective_weights: float32 ``[K]``, the last step's weights :math:`w`
      (:math:`d = \sum_i w_i g_i`).
    rng_key: the PRNG key of a random aggregator (:func:`pcgrad`,
      :func:`gradvac`, :func:`random`), else ``None``.
    rule_state: the rule's own state across steps: :func:`gradvac`'s ``[K, K]``
      cosine targets, :func:`moco`'s weights; ``None`` for the other rules.
  """

  steps: jax.Array
  skipped_steps: jax.Array
  grad_emas: tuple[PyTree, ...] | None
  gram_cosines: jax.Array
  objective_weights: jax.Array
  rng_key: jax.Array | None
  rule_state: PyTree = None


def _check_count(num_objectives: Any, api: str) -> int:
  return _checks.check_int(
    num_objectives,
    "num_objectives",
    api,
    "an int >= 1 (the length of the tuple of gradients that update takes)",
    lambda v: v >= 1,
  )


def _check_key(key: Any, api: str) -> None:
  is_seed = isinstance(key, numbers.Integral) and not isinstance(key, bool)
  dtype = getattr(key, "dtype", None)
  is_key = dtype is not None and (
    jnp.issubdtype(dtype, jax.dtypes.prng_key) or jnp.issubdtype(dtype, jnp.integer)
  )
  if not (is_seed or is_key):
    got = "None" if key is None else f"{type(key).__name__} {key!r}"[:80]
    raise TypeError(f"{api}: expected key to be a PRNG key or an int seed; got {got}.")


def _check_ema(ema_decay: Any, api: str) -> None:
  if ema_decay is not None:
    _checks.check_ema_decay(ema_decay, api)


# From this many objectives on, the Gram matrix's overflow branch is one
# stacked product per leaf (tm.gram) instead of a branch per pair: compile time
# then no longer grows steeply with K, at the cost of a temporary as large as
# the K gradients in that branch. Below it no step keeps a parameter-sized
# temporary.
DENSE_GRAM_FROM = 9


def _gram(
  trees, k: int, skip_slow: jax.Array | bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The Gram matrix of ``trees`` scaled by the common factor ``4**-m``
  (exact), whether they were finite, and ``m``: the true Gram matrix is the
  first times ``4**m``, which the rules whose weights depend on the scale
  (Nash-MTL, FairGrad) are told."""
  if k >= DENSE_GRAM_FROM:
    dots = tm.gram(trees, skip_slow)
    gram = dots.values
  else:
    dots = tm.safe_dots(trees, _upper(k), skip_slow)
    gram = tm.matrix_from_pairs(dots.values, _upper(k), (k, k), symmetric=True)
  top = jnp.max(dots.exps)
  shift = dots.exps[:, None] + dots.exps[None, :] - 2 * top
  return jnp.ldexp(gram, shift), dots.finite, top


def _upper(k: int) -> list[tuple[int, int]]:
  return [(i, j) for i in range(k) for j in range(i, k)]


def _aggregator(
  api: str,
  num_objectives: int,
  rule: Callable[..., tuple[jax.Array, PyTree]],
  ema_decay: jax.typing.ArrayLike | None,
  accumulator_dtype: Any,
  key: jax.Array | int | None = None,
  rule_state: PyTree = None,
  apply_to_emas: bool = False,
) -> optax.GradientTransformationExtraArgs:
  # ``rule(gram, log2_scale, key, rule_state) -> (weights, rule_state)``: ``gram``
  # is the Gram matrix divided by ``4**log2_scale``; ``key`` a fresh subkey for
  # a random rule (else None); ``rule_state`` the rule's own state (GradVac's
  # cosine targets, MoCo's weights), None for a rule without one.
  # ``apply_to_emas``: the weights combine the EMAs, not the current gradients
  # (MoCo's direction from its tracked gradients).
  k = _check_count(num_objectives, api)
  _check_ema(ema_decay, api)
  acc = None if accumulator_dtype is None else jnp.dtype(accumulator_dtype)
  random = key is not None
  if random and (
    isinstance(key, numbers.Integral)
    or (jnp.ndim(key) == 0 and jnp.issubdtype(jnp.result_type(key), jnp.integer))
  ):
    # A seed: a Python int, or a 0-d integer array (optax.inject_hyperparams
    # turns numeric arguments into arrays).
    key = jax.random.PRNGKey(key)

  def init_fn(params: PyTree) -> AggregatorState:
    params = _checks.check_params(params, api)
    emas = None
    if ema_decay is not None:
      emas = tuple(tm.zeros_accumulator(params, acc) for _ in range(k))
    return AggregatorState(
      steps=jnp.zeros([], jnp.int32),
      skipped_steps=jnp.zeros([], jnp.int32),
      grad_emas=emas,
      gram_cosines=jnp.eye(k, dtype=jnp.float32),
      objective_weights=jnp.full([k], 1 / k, jnp.float32),
      rng_key=jnp.asarray(key) if random else None,
      rule_state=rule_state,
    )

  def update_fn(updates, state: AggregatorState, params=None, **extra):
    del params, extra
    grads = _pair.split_objectives_checked(updates, k, api)
    if state.grad_emas is None:
      gram, finite, log2_scale = _gram(grads, k)
      emas = None
    else:
      _pair.check_same_layout(
        grads[0],
        state.grad_emas[0],
        api,
        "grads_0",
        "the params given to init",
        "Call init with the params whose gradients you pass to update.",
      )
      # Finiteness first (one read of every gradient), so that the EMAs can
      # be written in place; then the Gram matrix of the EMAs.
      if k >= DENSE_GRAM_FROM:
        finite = tm.all_finite(grads)
      else:
        finite = tm.safe_dots(grads, [(i, i) for i in range(k)]).finite
      beta = jnp.asarray(ema_decay, jnp.result_type(float))
      emas = tuple(
        tm.ema_update(e, g, beta, finite) for e, g in zip(state.grad_emas, grads, strict=True)
      )
      gram, _, log2_scale = _gram(emas, k, skip_slow=~finite)
    rng_key, sub = jax.random.split(state.rng_key) if random else (None, None)
    weights, rule_state = rule(gram, log2_scale, sub, state.rule_state)
    weights = jnp.where(finite, weights, jnp.nan)
    if rule_state is not None:  # a skipped step leaves the rule's state as it was
      rule_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old), rule_state, state.rule_state
      )
    # MoCo steps along its tracked gradients (the EMAs), every other rule along
    # the current ones.
    if apply_to_emas:  # in the gradients' dtype, as every aggregator's direction
      direction = tm.linear_combination(list(weights), emas)
      direction = jax.tree.map(lambda d, g: d.astype(g.dtype), direction, grads[0])
    else:
      direction = tm.linear_combination(list(weights), grads)
    new_state = AggregatorState(
      steps=optax.safe_increment(state.steps),
      skipped_steps=jnp.where(
        finite, state.skipped_steps, optax.safe_increment(state.skipped_steps)
      ),
      grad_emas=emas,
      gram_cosines=tm.cosine(gram, jnp.diag(gram)[:, None], jnp.diag(gram)[None, :]),
      objective_weights=weights.astype(jnp.float32),
      rng_key=rng_key,
      rule_state=rule_state,
    )
    return direction, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _no_key(rule):
  """An internal rule from a weight rule of the Gram matrix alone."""
  return lambda gram, log2_scale, key, rule_state: (rule(gram), rule_state)


def _keyed(rule):
  """An internal rule from a weight rule of the Gram matrix and a key."""
  return lambda gram, log2_scale, key, rule_state: (rule(gram, key), rule_state)


def mean(num_objectives: int) -> optax.GradientTransformationExtraArgs:
  r"""The average of the K gradients, :math:`d = \sum_i g_i / K`: the baseline.

  It reads no inner product, keeps no state and never skips a step.

  Args:
    num_objectives: the number :math:`K` of objectives: the length of the
      tuple of gradients ``update`` takes.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    :math:`(grads_0, \ldots, grads_{K-1})` and returns :math:`d` shaped like
    ``grads_0``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.mean(2)
    >>> d, _ = tx.update((jnp.array([1.0, 0.0]), jnp.array([0.0, 3.0])), tx.init(None))
    >>> d
    Array([0.5, 1.5], dtype=float32)
  """
  api = "aggregators.mean"
  k = _check_count(num_objectives, api)

  def init_fn(params):
    params = _checks.check_params(params, api)
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra):
    del params, extra
    grads = _pair.split_objectives_checked(updates, k, api)
    weights = [jnp.asarray(1 / k, jnp.float32)] * k
    return tm.linear_combination(weights, grads), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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


def pcgrad(
  num_objectives: int,
  key: jax.Array | int = 0,
  *,
  ema_decay: jax.typing.ArrayLike | None = None,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""PCGrad for K objectives: project away pairwise conflicts, then sum.

  For each :math:`i`, :math:`v_i` starts at :math:`g_i` and, for the other objectives
  :math:`j` in a random order, loses its component along :math:`g_j` whenever
  :math:`\langle v_i, g_j\rangle < 0`; :math:`d = \sum_i v_i` (see :func:`pcgrad_weights`). Each
  step draws K fresh orders from the key kept in the state. With K = 2 the
  order does not matter and :math:`d` equals ``bloop_optax.pcgrad(1.0)``.

  Args:
    num_objectives: the number :math:`K` of objectives.
    key: a PRNG key, or an int seed, for the visiting orders.
    ema_decay: ``None`` (default) or :math:`\beta`: decide the projections from the
      EMAs' Gram matrix, as in :func:`mgda`.
    accumulator_dtype: dtype of the EMAs.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; see :func:`mgda`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.pcgrad(2, key=0)
    >>> g1, g2 = jnp.array([1.0, 0.0]), jnp.array([-1.0, 1.0])
    >>> d, _ = tx.update((g1, g2), tx.init(g1))
    >>> d  # (g1 off g2) + (g2 off g1)
    Array([0.5, 1.5], dtype=float32)

  References:
    Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task
    Learning", NeurIPS 2020, Algorithm 1.
  """
  api = "aggregators.pcgrad"
  k = _check_count(num_objectives, api)
  _check_key(key, api)

  def rule(gram, step_key):
    return pcgrad_weights(gram, _orders(step_key, k))

  return _aggregator(api, k, _keyed(rule), ema_decay, accumulator_dtype, key=key)


def cagrad(
  num_objectives: int,
  c: jax.typing.ArrayLike = 0.5,
  *,
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
  rule = _no_key(lambda gram: cagrad_weights(gram, c))
  return _aggregator(api, num_objectives, rule, ema_decay, accumulator_dtype)


def imtl_g(
  num_objectives: int,
  *,
  ema_decay: jax.typing.ArrayLike | None = None,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""IMTL-G: the combination with equal projections on every unit gradient.

  :math:`d = \sum_i w_i g_i` with :math:`\sum_i w_i = 1` and :math:`\langle d, g_i / |g_i|\rangle`
  the same for every :math:`i` (see :func:`imtl_g_weights`; the pseudo-inverse
  extends it to linearly dependent gradients).

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
    >>> tx = aggregators.imtl_g(2)
    >>> g1, g2 = jnp.array([1.0, 0.0]), jnp.array([0.0, 3.0])
    >>> d, _ = tx.update((g1, g2), tx.init(g1))
    >>> d  # equal projections on e1 and e2
    Array([0.75, 0.75], dtype=float32)

  References:
    Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial
    Multi-task Learning", ICLR 2021; Quinton and Rey, "Jacobian Descent for
    Multi-Objective Optimization", arXiv:2406.16232 (dependent gradients).
  """
  rule = _no_key(imtl_g_weights)
  return _aggregator("aggregators.imtl_g", num_objectives, rule, ema_decay, accumulator_dtype)


def aligned_mtl(
  num_objectives: int,
  *,
  ema_decay: jax.typing.ArrayLike | None = None,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Aligned-MTL: the mean of the gradients after aligning them.

  The balance matrix :math:`B = \sqrt{\lambda_{\min}} V \operatorname{diag}(\lambda)^{-1/2} V^T`
  (from the eigendecomposition of the Gram matrix, restricted to its rank) turns the
  gradients into orthogonal vectors of equal norm :math:`\sqrt{\lambda_{\min}}`; :math:`d` is
  their mean (see :func:`aligned_mtl_weights`).

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
    >>> tx = aggregators.aligned_mtl(2)
    >>> g1, g2 = jnp.array([1.0, 0.0]), jnp.array([0.0, 3.0])
    >>> d, _ = tx.update((g1, g2), tx.init(g1))
    >>> d  # both rescaled to the smaller norm, then averaged
    Array([0.5, 0.5], dtype=float32)

  References:
    Senushkin, Patakin, Kuznetsov, Konushin, "Independent Component Alignment
    for Multi-Task Learning", CVPR 2023, Algorithm 1.
  """
  rule = _no_key(aligned_mtl_weights)
  return _aggregator("aggregators.aligned_mtl", num_objectives, rule, ema_decay, accumulator_dtype)


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


def config(
  num_objectives: int,
  *,
  ema_decay: jax.typing.ArrayLike | None = None,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""ConFIG: a conflict-free direction with equal cosines to every gradient.

  The direction :math:`\hat d` makes the same angle with every gradient (the
  least-norm solution of :math:`\langle \hat d, g_i / \|g_i\|\rangle = 1`, normalised),
  and its length is the sum of the gradients' components along it (see
  :func:`config_weights`). This is the variant TorchJD implements (the paper's
  Equation 4, without its momentum version).

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
    >>> tx = aggregators.config(2)
    >>> g1, g2 = jnp.array([1.0, 0.0]), jnp.array([0.0, 2.0])
    >>> d, _ = tx.update((g1, g2), tx.init(g1))
    >>> d  # along (1, 1), with length <g1 + g2, (1, 1) / sqrt(2)>
    Array([1.5, 1.5], dtype=float32)

  References:
    Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free Training of Physics
    Informed Neural Networks", ICLR 2025 (arXiv:2408.11104).
  """
  rule = _no_key(config_weights)
  return _aggregator("aggregators.config", num_objectives, rule, ema_decay, accumulator_dtype)


def krum(
  num_objectives: int,
  n_byzantine: int = 0,
  n_selected: int = 1,
  *,
  ema_decay: jax.typing.ArrayLike | None = None,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Krum: the mean of the gradients that sit closest to the others.

  A robust rule: with up to ``n_byzantine`` arbitrary (faulty) gradients among
  the :math:`K`, it keeps the ``n_selected`` gradients whose squared distances to
  their nearest neighbours sum lowest (see :func:`krum_weights`); distances come
  from the Gram matrix.

  Args:
    num_objectives: the number :math:`K \ge` ``n_byzantine + 3`` of objectives.
    n_byzantine: the number :math:`f` of gradients that may be arbitrary.
    n_selected: how many gradients to average (1: Krum, more: Multi-Krum).
    ema_decay: ``None`` (default) or :math:`\beta`: decide the weights from the EMAs'
      Gram matrix, as in :func:`mgda`.
    accumulator_dtype: dtype of the EMAs.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; see :func:`mgda`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.krum(4, n_byzantine=1, n_selected=2)
    >>> grads = tuple(jnp.array(v) for v in ([1.0, 0.0], [1.1, 0.0], [0.9, 0.1], [-9.0, 5.0]))
    >>> d, state = tx.update(grads, tx.init(grads[0]))
    >>> state.objective_weights  # the outlier is never chosen
    Array([0.5, 0.5, 0. , 0. ], dtype=float32)

  References:
    Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017.
  """
  api = "aggregators.krum"
  k = _check_count(num_objectives, api)
  _check_krum(k, n_byzantine, n_selected, api)
  rule = _no_key(lambda gram: krum_weights(gram, n_byzantine, n_selected))
  return _aggregator(api, k, rule, ema_decay, accumulator_dtype)


def random(num_objectives: int, key: jax.Array | int = 0) -> optax.GradientTransformationExtraArgs:
  r"""Random loss weighting: the gradients weighted by softmax of a normal draw.

  Every step draws :math:`z \sim N(0, I_K)` from the key in the state and returns
  :math:`d = \sum_i \operatorname{softmax}(z)_i g_i` (see :func:`random_weights`). The
  weights do not depend on the gradients, so there is no EMA option.

  Args:
    num_objectives: the number :math:`K` of objectives.
    key: a PRNG key, or an int seed.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; see :func:`mgda`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.random(3, key=0)
    >>> g = jnp.ones(2)
    >>> d, state = tx.update((g, g, g), tx.init(g))
    >>> round(float(state.objective_weights.sum()), 6)  # weights on the simplex
    1.0

  References:
    Lin, Ye, Xu, Shi, Zhang, Kwok, "Reasonable Effectiveness of Random
    Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022.
  """
  api = "aggregators.random"
  _check_key(key, api)
  return _aggregator(api, num_objectives, _keyed(random_weights), None, None, key=key)


def constant(weights: jax.typing.ArrayLike) -> optax.GradientTransformationExtraArgs:
  r"""Fixed weights: :math:`d = \sum_i w_i g_i` with the given :math:`w`.

  ``constant(jnp.ones(K))`` sums the gradients; :func:`mean` averages them.

  Args:
    weights: the :math:`K` weights, a 1-d array or sequence of numbers.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; see :func:`mgda`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.constant([1.0, 0.5])
    >>> d, _ = tx.update((jnp.array([2.0, 0.0]), jnp.array([0.0, 4.0])), tx.init(None))
    >>> d
    Array([2., 2.], dtype=float32)
  """
  api = "aggregators.constant"
  values = np.asarray(weights)
  if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.bool_):
    raise TypeError(
      f"{api}: expected weights to be a 1-d sequence of K >= 1 numbers; got {weights!r}."
    )
  if values.ndim != 1 or values.size < 1:
    raise ValueError(
      f"{api}: expected weights to be a 1-d sequence of K >= 1 numbers; got {weights!r}."
    )
  if not np.all(np.isfinite(values)):
    raise ValueError(f"{api}: expected finite weights; got {weights!r}.")
  rule = _no_key(lambda gram: constant_weights(gram, values))
  return _aggregator(api, int(values.size), rule, None, None)


def nash_mtl(
  num_objectives: int,
  max_norm: jax.typing.ArrayLike | None = 1.0,
  *,
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


def gradvac(
  num_objectives: int,
  target_decay: jax.typing.ArrayLike = 0.5,
  key: jax.Array | int = 0,
  *,
  ema_decay: jax.typing.ArrayLike | None = None,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""GradVac: raise each pair's cosine to a target kept across steps.

  For each :math:`i`, :math:`v_i` starts at :math:`g_i` and, for the other objectives
  in a random order, gains a multiple of :math:`g_j` whenever
  :math:`\cos(v_i, g_j)` is below its target :math:`\hat\phi_{ij}`, which lifts it to
  the target; the targets are EMAs of the observed cosines, kept in the state
  (``rule_state``, starting at 0); :math:`d = \sum_i v_i` (see
  :func:`gradvac_weights`). With targets 0 this is PCGrad's projection. This is
  the variant TorchJD and LibMTL implement, on whole gradients (not per layer).

  Args:
    num_objectives: the number :math:`K` of objectives.
    target_decay: the weight on the old target (the paper's :math:`\beta` is
      ``1 - target_decay``; 0.5 as TorchJD's default).
    key: a PRNG key, or an int seed, for the visiting orders.
    ema_decay: ``None`` (default) or :math:`\beta`: decide from the EMAs' Gram matrix,
      as in :func:`mgda`.
    accumulator_dtype: dtype of the EMAs.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; see :func:`mgda`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.gradvac(2)
    >>> g1, g2 = jnp.array([1.0, 0.0]), jnp.array([-1.0, 1.0])
    >>> d, state = tx.update((g1, g2), tx.init(g1))
    >>> d  # targets 0 at the first step: PCGrad's (g1 off g2) + (g2 off g1)
    Array([0.5, 1.5], dtype=float32)
    >>> state.rule_state  # the targets moved halfway to the cosine -0.707
    Array([[ 0.        , -0.35355338],
           [-0.35355338,  0.        ]], dtype=float32)

  References:
    Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and Improving
    Multi-task Optimization in Massively Multilingual Models", ICLR 2021.
  """
  api = "aggregators.gradvac"
  k = _check_count(num_objectives, api)
  _check_key(key, api)
  _checks.check_number(target_decay, "target_decay", api, "in [0, 1]", lambda v: 0 <= v <= 1)

  def rule(gram, log2_scale, step_key, targets):
    weights, new = gradvac_weights(gram, targets, _orders(step_key, k), target_decay)
    return weights, new.astype(targets.dtype)  # float32 targets, a stable state type

  targets = jnp.zeros([k, k], jnp.float32)
  return _aggregator(api, k, rule, ema_decay, accumulator_dtype, key=key, rule_state=targets)


def moco(
  num_objectives: int,
  ema_decay: jax.typing.ArrayLike = 0.9,
  step_size: jax.typing.ArrayLike = 0.1,
  rho: jax.typing.ArrayLike = 0.0,
  *,
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
    new = moco_weights(gram, weights, step_size, rho)
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
  inner: optax.GradientTransformation, decay: jax.typing.ArrayLike = 0.9
) -> optax.GradientTransformationExtraArgs:
  r"""CR-MOGM: an EMA of the weights of any aggregator of this module.

  At each step the wrapped aggregator chooses its weights :math:`\hat\lambda_t`
  from the current gradients (or its EMAs); this applies

  .. math:: \lambda_t = \gamma \lambda_{t-1} + (1 - \gamma) \hat\lambda_t,
    \qquad d = \sum_i \lambda_{t,i} g_i,

  with :math:`\gamma` = ``decay`` and :math:`\lambda_1 = \hat\lambda_1`. Smoothing the
  weights rather than the gradients (as ``ema_decay`` does) is what the paper
  proves convergent for stochastic MGDA-type methods; the paper's schedule
  raises :math:`\gamma` toward 1 as the learning rate decays, which
  ``optax.inject_hyperparams`` can drive. The wrapped aggregator's own direction
  is not used (``jit`` removes it). A step whose gradients are not finite leaves
  :math:`\lambda` unchanged and returns NaN, as every aggregator here.

  Args:
    inner: an aggregator of :mod:`bloop_optax.aggregators` (its state an
      :class:`AggregatorState`).
    decay: :math:`\gamma \in [0, 1]`, the weight on the old weights (0: the
      wrapped aggregator itself).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` on the same tuple of gradients;
    its state is a :class:`SmoothedWeightsState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.cr_mogm(aggregators.mgda(2), decay=0.5)
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
  _checks.check_number(decay, "decay", api, "in [0, 1]", lambda v: 0 <= v <= 1)
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
    gamma = jnp.asarray(decay, jnp.float32)
    smoothed = jnp.where(first, chosen, gamma * state.objective_weights + (1 - gamma) * chosen)
    kept = jnp.where(finite, smoothed, state.objective_weights)
    grads = _pair.split_objectives_checked(updates, k, api)
    applied = jnp.where(finite, kept, jnp.nan)
    direction = tm.linear_combination(list(applied), grads)
    return direction, SmoothedWeightsState(inner_state, kept)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
