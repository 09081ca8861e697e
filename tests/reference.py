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


FLOAT32_RTOL = 16 * np.finfo(np.float32).eps


def hierarchical_bloop(mains, auxes, lams, beta, rtol=FLOAT32_RTOL):
  """Hierarchical Bloop (paper 2.3): ``auxes[k][t]`` is aux k+1 at step t.

  Returns the directions and, per step, the orthogonalised EMAs Q_0..Q_{K-1}.
  """
  levels = len(lams)
  emas = [np.zeros_like(mains[0]) for _ in range(levels)]
  directions, bases = [], []
  for t, m in enumerate(mains):
    grads = [m] + [aux[t] for aux in auxes]
    if all(np.all(np.isfinite(g)) for g in grads):
      emas = [beta * e + (1 - beta) * g for e, g in zip(emas, grads, strict=False)]
    qs = []
    for e in emas:  # classical Gram-Schmidt
      q = e.copy()
      for qi in qs:
        if qi @ qi > 0:
          q = q - (e @ qi) / (qi @ qi) * qi
      qs.append(q if q @ q > rtol * (e @ e) else np.zeros_like(q))
    d = m.copy()
    for k in range(1, levels + 1):
      part = grads[k].copy()
      for q in qs[:k]:
        if q @ q > 0:
          part = part - (grads[k] @ q) / (q @ q) * q
      d = d + lams[k - 1] * part
    directions.append(d)
    bases.append(qs)
  return directions, bases
