"""Priority-Constrained Descent in plain NumPy, written from its definition.

The program ``min_d |d - g~_1|^2 / 2 s.t. <g~_j, d> >= tau_j |g~_j|^2`` is solved
by brute force on the vectors themselves: the projection of ``g~_1`` onto a
polyhedron lies on the affine hull of one of its faces, so every subset S of the
constraints is made to hold with equality (the least-squares projection onto
``{d : <g~_j, d> = tau_j |g~_j|^2, j in S}``), the candidates that satisfy every
constraint are kept, and the closest to ``g~_1`` wins. No candidate: the
constraints cannot all hold, and the step is ``g_1``. Nothing here is shared with
the package's solver (no Gram matrix, no multipliers, no active set).
"""

import itertools

import numpy as np


def solve(normalised, taus, tol=1e-9):
  """``d~`` for the rows of ``normalised`` (the primary first), or None when
  the constraints are infeasible."""
  g1, rest = normalised[0], normalised[1:]
  bounds = np.asarray(taus) * np.sum(rest**2, axis=1)
  scale = max(1.0, np.max(np.abs(normalised)) ** 2)
  best = None
  for size in range(len(rest) + 1):
    for subset in itertools.combinations(range(len(rest)), size):
      d = g1.copy()
      if subset:
        a = rest[list(subset)]
        # The closest point to g1 with a d = bounds[subset]: g1 + a^T y, a a^T y = residual.
        y = np.linalg.lstsq(a @ a.T, bounds[list(subset)] - a @ g1, rcond=None)[0]
        d = g1 + a.T @ y
        if np.max(np.abs(a @ d - bounds[list(subset)])) > tol * scale:
          continue  # the equalities themselves cannot hold together
      if np.all(rest @ d >= bounds - tol * scale):
        if best is None or np.sum((d - g1) ** 2) < np.sum((best - g1) ** 2):
          best = d
  return best


class PCD:
  """The stateful method: the bias-corrected EMA of the squared norms, the
  normalised program, the step rescaled to ``|g_1|``."""

  def __init__(self, tau, norm_decay=0.999, eps=1e-8):
    self.tau, self.beta, self.eps = tau, norm_decay, eps
    self.ema, self.count = None, 0

  def __call__(self, jac, decide_from=None):
    """The direction for the rows of ``jac``; the decision from the rows of
    ``decide_from`` (e.g. EMAs of the gradients) when given."""
    jac = np.asarray(jac, np.float64)
    rows = jac if decide_from is None else np.asarray(decide_from, np.float64)
    if not np.all(np.isfinite(jac)):
      return np.full(jac.shape[1], np.nan)
    k = len(jac)
    taus = np.broadcast_to(np.asarray(self.tau, np.float64), (k - 1,))
    sq = np.sum(rows**2, axis=1)
    self.ema = (
      (1 - self.beta) * sq if self.ema is None else self.beta * self.ema + (1 - self.beta) * sq
    )
    self.count += 1
    v_hat = self.ema / (1 - self.beta**self.count)
    denom = np.sqrt(v_hat + self.eps)
    scales = np.where(denom > 0, 1 / np.where(denom > 0, denom, 1), 0)
    norm1 = np.sqrt(sq[0])
    if norm1 == 0:
      return np.zeros(jac.shape[1])
    d_tilde = solve(rows * scales[:, None], taus)
    if d_tilde is None:
      weights = np.eye(k)[0]
    else:
      # d~ as a combination of the normalised rows, to apply to jac's rows.
      coef = np.linalg.lstsq((rows * scales[:, None]).T, d_tilde, rcond=None)[0]
      if np.linalg.norm(d_tilde) <= 1e-12 * np.max(np.linalg.norm(rows * scales[:, None], axis=1)):
        return np.zeros(jac.shape[1])
      weights = coef * scales * norm1 / np.linalg.norm(d_tilde)
    return weights @ jac
