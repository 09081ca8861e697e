"""A plain NumPy reference for the multi-objective aggregators.

Written from each method's paper on the K x P matrix ``J`` whose rows are the
gradients, in float64, with no Gram-matrix shortcut and no iterative solver:
the constrained problems are solved by enumerating every face (every subset of
active constraints), solving the equality-constrained problem on it in the
parameter space with least squares, and keeping the best feasible candidate.
Exponential in K, exact, and independent of the package's active-set method.
Nash-MTL's and FairGrad's equations have no closed form: they are solved with
SciPy's ``least_squares`` (a trust-region method, not the package's Newton
steps) on the logarithms of the weights, started from BFGS on the equivalent
convex problem, to 1e-8 in the equation (rounding, where a ridge-sized
direction makes the weights large).
"""

import functools
import itertools

import numpy as np
from scipy import optimize

TOL = 1e-9


def db_mtl(jac):
  """DB-MTL's gradient balancing: every row rescaled to the largest row norm, summed."""
  norms = np.linalg.norm(jac, axis=1)
  if not np.any(norms > 0):
    return np.zeros(jac.shape[1])
  scaled = [row * (norms.max() / n) for row, n in zip(jac, norms, strict=True) if n > 0]
  return np.sum(scaled, axis=0)


def scale_free(method):
  """Runs ``method`` on ``J / max|J|`` and scales the direction back (every
  method is positively homogeneous), so the tolerances below are relative."""

  @functools.wraps(method)
  def wrapped(jac, *args):
    scale = np.abs(jac).max()
    if scale == 0:
      return np.zeros(jac.shape[1])
    return scale * method(jac / scale, *args)

  return wrapped


def _subsets(k):
  for size in range(1, k + 1):
    yield from itertools.combinations(range(k), size)


def _affine_min_norm(rows):
  """The point of the affine hull of ``rows`` nearest to 0, and coefficients
  summing to 1 that give it."""
  base, others = rows[0], rows[1:]
  if len(others):
    diffs = others - base
    coef, *_ = np.linalg.lstsq(diffs.T, -base, rcond=None)
    point = base + diffs.T @ coef
    weights = np.concatenate([[1 - coef.sum()], coef])
  else:
    point, weights = base.copy(), np.ones(1)
  return point, weights


def mean(jac):
  return jac.mean(axis=0)


@scale_free
def mgda(jac):
  """Min-norm point of the convex hull of the rows (Désidéri 2012)."""
  best = None
  for face in _subsets(len(jac)):
    point, weights = _affine_min_norm(jac[list(face)])
    if np.all(weights >= -TOL) and (best is None or point @ point < best @ best - 1e-15):
      best = point
  return best


@scale_free
def pcgrad(jac, orders):
  """Yu et al. 2020, Algorithm 1, with the given visiting orders; a sum."""
  out = np.zeros(jac.shape[1])
  for i, order in enumerate(orders):
    v = jac[i].copy()
    for j in order:
      if j == i:
        continue
      inner = v @ jac[j]
      if inner < 0:
        v = v - inner / (jac[j] @ jac[j]) * jac[j]
    out += v
  return out


@scale_free
def imtl_g(jac):
  """Liu et al. 2021 (IMTL-G closed form), for linearly independent rows."""
  units = jac / np.linalg.norm(jac, axis=1, keepdims=True)
  if len(jac) == 1:
    return jac[0].copy()
  d = jac[0] - jac[1:]  # rows g_1 - g_i
  u = units[0] - units[1:]
  alpha = jac[0] @ u.T @ np.linalg.inv(d @ u.T)
  weights = np.concatenate([[1 - alpha.sum()], alpha])
  return weights @ jac


@scale_free
def aligned_mtl(jac):
  """Senushkin et al. 2023: rows aligned to orthogonal vectors of equal norm
  (the smallest nonzero singular value), then averaged."""
  k = len(jac)
  left, sing, right = np.linalg.svd(jac, full_matrices=False)
  rank = int(np.sum(sing**2 > np.max(sing**2) * k * np.finfo(float).eps))
  if rank == 0:
    return jac.mean(axis=0)
  left, sing, right = left[:, :rank], sing[:rank], right[:rank]
  aligned = sing[-1] * left @ right  # B J with B = s_min U S^-1 U^T
  return aligned.mean(axis=0)


def _project_on_cone(x, jac):
  """Euclidean projection of ``x`` onto {d : jac @ d >= 0}."""
  best, best_dist = (x.copy(), 0.0) if np.all(jac @ x >= -TOL) else (None, np.inf)
  for active in _subsets(len(jac)):
    rows = jac[list(active)]
    coef, *_ = np.linalg.lstsq(rows.T, x, rcond=None)
    d = x - rows.T @ coef  # x projected onto {d : rows @ d = 0}
    dist = np.sum((d - x) ** 2)
    if np.all(jac @ d >= -TOL * max(1.0, np.abs(x).max())) and dist < best_dist - 1e-15:
      best, best_dist = d, dist
  return best


@scale_free
def upgrad(jac):
  """Quinton and Rey 2024: every row / K projected onto the dual cone, summed."""
  k = len(jac)
  return sum(_project_on_cone(jac[i] / k, jac) for i in range(k))


@scale_free
def cagrad(jac, c):
  """Liu et al. 2021: d = g0 + c|g0| g_w / |g_w|, g_w minimising
  <g_w, g0> + c |g0| |g_w| over the convex hull of the rows.

  On the affine hull of a face, with q its min-norm point and a the part of
  g0 along the hull's directions, the minimiser is q - tau a / |a| with
  tau = |q| |a| / sqrt(r^2 - |a|^2) (r = c |g0|), provided |a| < r.
  """
  g0 = jac.mean(axis=0)
  r = c * np.linalg.norm(g0)
  if r == 0:
    return g0
  best, best_value = None, np.inf
  for face in _subsets(len(jac)):
    rows = jac[list(face)]
    q, _ = _affine_min_norm(rows)
    diffs = rows[1:] - rows[0]
    if len(diffs):
      basis, sing, _ = np.linalg.svd(diffs.T, full_matrices=False)
      basis = basis[:, sing > 1e-12 * max(1.0, sing.max())]
      a = basis @ (basis.T @ g0)
    else:
      a = np.zeros_like(g0)
    norm_a = np.linalg.norm(a)
    if norm_a >= r:
      continue
    y = (
      q if norm_a == 0 else q - np.linalg.norm(q) * norm_a / np.sqrt(r**2 - norm_a**2) * a / norm_a
    )
    # y must lie in the face (coefficients >= 0).
    system = np.vstack([rows.T, np.ones(len(rows))])
    weights, *_ = np.linalg.lstsq(system, np.concatenate([y, [1.0]]), rcond=None)
    if (
      np.any(weights < -1e-9) or np.linalg.norm(system @ weights - np.concatenate([y, [1]])) > 1e-8
    ):
      continue
    value = y @ g0 + r * np.linalg.norm(y)
    if value < best_value - 1e-15:
      best, best_value = y, value
  norm = np.linalg.norm(best)
  if norm <= np.sqrt(np.finfo(float).eps) * np.linalg.norm(jac, axis=1).max():
    return np.zeros_like(g0)  # g_w = 0: d is undefined; 0 by convention
  return g0 + r / norm * best


@scale_free
def dualproj(jac):
  """Quinton and Rey 2024: the mean of the rows projected onto the dual cone."""
  return _project_on_cone(jac.mean(axis=0), jac)


@scale_free
def config(jac):
  """Liu et al. 2024 (ConFIG), Equation 4: the least-norm vector with unit
  projections on every unit gradient, normalised, times the sum of the
  gradients' components along it. Zero gradients give zero unit vectors."""
  norms = np.linalg.norm(jac, axis=1, keepdims=True)
  units = np.divide(jac, norms, out=np.zeros_like(jac), where=norms > 0)
  best = np.linalg.pinv(units) @ np.ones(len(jac))
  size = np.linalg.norm(best)
  if size <= 1e-12:
    return np.zeros(jac.shape[1])
  unit = best / size
  return np.sum(jac @ unit) * unit


def krum(jac, n_byzantine, n_selected):
  """Blanchard et al. 2017 (Multi-Krum): score = sum of squared distances to
  the K - f - 2 nearest other rows; mean of the n_selected lowest scores."""
  k = len(jac)
  dist = ((jac[:, None, :] - jac[None, :, :]) ** 2).sum(axis=2)
  scores = [np.sort(np.delete(dist[i], i))[: k - n_byzantine - 2].sum() for i in range(k)]
  chosen = np.argsort(scores, kind="stable")[:n_selected]
  return jac[chosen].mean(axis=0)


def _solve_fair(matrix, p):
  """The ``w > 0`` with ``matrix @ w = w**-p``: the minimiser of the convex
  ``w A w / 2 - sum(phi(w))`` (``phi' = w**-p``), found by BFGS on ``u = log w``
  (where every local minimum is that one), then polished by ``least_squares``
  on the equation."""
  phi = np.log if p == 1 else lambda w: w ** (1 - p) / (1 - p)

  def energy(u):
    w = np.exp(u)
    return 0.5 * w @ matrix @ w - np.sum(phi(w)), w * (matrix @ w - w**-p)

  start = -np.log(np.diag(matrix)) / (1 + p)
  rough = optimize.minimize(energy, start, jac=True, method="BFGS", options={"gtol": 1e-12})

  def residual(u):
    w = np.exp(u)
    return (matrix @ w) * w**p - 1

  fit = optimize.least_squares(residual, rough.x, xtol=1e-15, ftol=1e-15, gtol=1e-15)
  assert np.abs(fit.fun).max() < 1e-8, np.abs(fit.fun).max()
  return np.exp(fit.x)


def nash_mtl(jac, ridge=1e-6, max_norm=None):
  """Nash-MTL (Navon et al. 2022): ``G w = 1 / w``, with the package's ridge on
  the cosines, which on ``G`` is ``(G + ridge diag(G)) w = 1 / w``; a zero
  gradient has weight 0; then ``|d| <= max_norm``."""
  norms2 = np.sum(jac**2, axis=1)
  live = norms2 > 0
  w = np.zeros(len(jac))
  if live.any():
    sub = jac[live]
    w[live] = _solve_fair(sub @ sub.T + ridge * np.diag(norms2[live]), 1.0)
  d = w @ jac
  if max_norm is not None and np.linalg.norm(d) > max_norm:
    d = d * max_norm / np.linalg.norm(d)
  return d


def fairgrad(jac, alpha, ridge=1e-6):
  """FairGrad (Ban and Ji 2024): ``G w = w**(-1 / alpha)``, with the package's
  ridge relative to the largest squared norm: ``(G + ridge max_i G_ii I)``."""
  gram = jac @ jac.T
  if alpha == 0:
    return jac.mean(axis=0)
  top = np.max(np.diag(gram)) if np.max(np.diag(gram)) > 0 else 1.0
  return _solve_fair(gram + ridge * top * np.eye(len(jac)), 1 / alpha) @ jac


def gradvac(jac, targets, orders, target_decay):
  """GradVac (Wang et al. 2021), the loop on vectors: returns ``(d, targets)``."""
  k = len(jac)
  targets = np.array(targets, np.float64)
  rows = []
  for i in range(k):
    v = jac[i].copy()
    for j in orders[i]:
      if j == i:
        continue
      norm_v, norm_j = np.linalg.norm(v), np.linalg.norm(jac[j])
      phi = v @ jac[j] / (norm_v * norm_j) if norm_v * norm_j > 0 else 0.0
      target = targets[i, j]
      root_target = np.sqrt(max(1 - target**2, 0))
      if phi < target and norm_j * root_target > 0:
        coef = norm_v * (target * np.sqrt(max(1 - phi**2, 0)) - phi * root_target)
        v = v + coef / (norm_j * root_target) * jac[j]
      targets[i, j] = target_decay * target + (1 - target_decay) * phi
    rows.append(v)
  return np.sum(rows, axis=0), targets


def onto_simplex(v):
  """Euclidean projection onto the probability simplex, by bisection on the
  threshold ``t`` of ``max(v - t, 0)`` (a different method from the package's
  sort)."""
  lo, hi = v.min() - 1, v.max()
  for _ in range(200):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if np.maximum(v - mid, 0).sum() > 1 else (lo, mid)
  return np.maximum(v - (lo + hi) / 2, 0)


def moco(grad_steps, ema_decay, step_size, rho):
  """MoCo (Fernando et al. 2023) over a sequence of K x P Jacobians: tracked
  gradients (EMAs from 0), one projected step of the weights on the Gram
  matrix normalised by its largest diagonal entry, d = lambda @ Y. Returns the
  directions and the weights after each step."""
  k = len(grad_steps[0])
  tracked = np.zeros_like(grad_steps[0])
  lam = np.full(k, 1 / k)
  out = []
  for jac in grad_steps:
    tracked = ema_decay * tracked + (1 - ema_decay) * jac
    gram = tracked @ tracked.T
    top = np.max(np.diag(gram))
    gram = gram / top if top > 0 else gram
    lam = onto_simplex(lam - step_size * (gram @ lam + rho * lam))
    out.append((lam @ tracked, lam.copy()))
  return out
