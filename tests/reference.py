"""A plain NumPy reference, written from the formulas of SPEC.md.

Everything works on flat float64 vectors, one step at a time, with Python
control flow: slow and obvious on purpose. The tests flatten pytrees into these
vectors, so any per-leaf (instead of global) inner product in the package shows
up as a mismatch.
"""

import numpy as np


def project_out(a, p):
  """pi(a; p) = a - (<a, p> / <p, p>) p, with the coefficient 0 when p = 0."""
  pp = p @ p
  coef = (a @ p) / pp if pp != 0 else 0.0
  return a - coef * p


def cosine(m, a):
  den = np.sqrt(m @ m) * np.sqrt(a @ a)
  return (m @ a) / den if den != 0 else 0.0


def bloop(mains, auxs, lam, beta, order="update_first", lams=None):
  """Runs Bloop over a sequence of steps.

  Returns the directions, the EMA after every step, and the per-step
  projection coefficients. A step with a non-finite M or A leaves the EMA
  unchanged; its direction is whatever the formula gives (NaN passes through).
  """
  with np.errstate(invalid="ignore"):  # inf - inf: NaN passes through
    return _bloop(mains, auxs, lam, beta, order, lams)


def _bloop(mains, auxs, lam, beta, order, lams):
  ema = np.zeros_like(mains[0])
  has_ema = False
  directions, emas, coefs = [], [], []
  for t, (m, a) in enumerate(zip(mains, auxs, strict=True)):
    weight = lam if lams is None else lams[t]
    finite = np.all(np.isfinite(m)) and np.all(np.isfinite(a))
    if order == "update_first":
      p = beta * ema + (1 - beta) * m
    else:
      p = ema if has_ema else m
    pp = p @ p
    r = (p @ a) / pp if pp != 0 else 0.0
    directions.append(m + weight * (a - r * p))
    if finite:
      ema = p if order == "update_first" else beta * p + (1 - beta) * m
      has_ema = True
    emas.append(ema.copy())
    coefs.append(r)
  return directions, emas, coefs


def mixed(m, a, lam):
  return m + lam * a


def dynamic_barrier(m, a, lam):
  mm = m @ m
  r = (m @ a) / mm if mm != 0 else 0.0
  return max(1 - lam * r, 0.0) * m + lam * a


def pcgrad(m, a, lam):
  if m @ a >= 0:
    return m + lam * a
  return project_out(m, a) + lam * project_out(a, m)
