"""Small dense problems on a K x K Gram matrix, solved inside ``jit``.

The multi-objective aggregators decide K weights from the Gram matrix of the K
gradients. Two of their subproblems are convex quadratic programs with sign
constraints:

- on the simplex (MGDA's min-norm point, CAGrad's inner projection):
  ``min_x  x^T Q x / 2 + c^T x  s.t.  x >= 0, sum(x) = 1``;
- on the non-negative orthant (UPGrad's dual-cone projections):
  ``min_x  x^T Q x / 2 + c^T x  s.t.  x >= 0``.

Both are solved by a primal active-set method (Lawson and Hanson's, extended to
a general positive semi-definite ``Q`` and an optional equality): the free set
grows by the index whose gradient most violates optimality, and each step
solves the equality-constrained problem on the free set exactly, through the
pseudo-inverse of its (symmetric) KKT matrix, so singular Gram matrices
(collinear or repeated gradients) are handled. The method ends in finitely many
steps; it runs in a ``lax.while_loop`` with a fixed budget, with no host round
trip. Every iterate is feasible. Tolerances are relative to the problem's
scale (``_tolerance``).
"""

import jax
from jax import lax
import jax.numpy as jnp

# Iterations of the active-set loop: k adds and at most as many removals per
# add are typical; 4 K + 8 leaves a wide margin (tests count them).
ACTIVE_SET_BUDGET = lambda k: 4 * k + 8  # noqa: E731


def _tolerance(dtype) -> jax.Array:
  return 64 * jnp.finfo(dtype).eps


def pinv_symmetric(m: jax.Array, rtol: jax.Array | float | None = None) -> jax.Array:
  """Pseudo-inverse of a symmetric matrix from its eigendecomposition.

  Eigenvalues with magnitude at most ``rtol`` times the largest count as zero
  (default: the size times the dtype's epsilon, as numpy's ``pinv``).
  """
  n = m.shape[-1]
  if rtol is None:
    rtol = n * jnp.finfo(m.dtype).eps
  lam, vec = jnp.linalg.eigh(m)
  cutoff = rtol * jnp.max(jnp.abs(lam))
  keep = jnp.abs(lam) > cutoff
  inv = jnp.where(keep, 1 / jnp.where(keep, lam, 1), 0)
  return (vec * inv) @ vec.T


def _free_set_solution(q, c, free, simplex):
  """Minimiser of ``x^T Q x / 2 + c^T x`` over ``x`` zero off ``free`` (and
  summing to 1 with ``simplex``), from the KKT system ``[[Q_FF, 1], [1, 0]]``
  padded with identity rows for the fixed coordinates."""
  k = q.shape[0]
  f = free.astype(q.dtype)
  top = jnp.outer(f, f) * q + jnp.diag(1 - f)
  ones = f if simplex else jnp.zeros([k], q.dtype)
  corner = jnp.zeros([1, 1], q.dtype) if simplex else jnp.ones([1, 1], q.dtype)
  kkt = jnp.block([[top, ones[:, None]], [ones[None, :], corner]])
  rhs = jnp.concatenate([-c * f, jnp.full([1], 1.0 if simplex else 0.0, q.dtype)])
  inv = pinv_symmetric(kkt)
  z = inv @ rhs
  z = z + inv @ (rhs - kkt @ z)  # one step of iterative refinement
  return z[:k] * f


def active_set(q, c, x0, free0, simplex, budget=None):
  """Solves the QP of the module docstring from a feasible start.

  Args:
    q: ``[K, K]`` symmetric positive semi-definite.
    c: ``[K]``.
    x0: a feasible ``[K]`` start, zero off ``free0``.
    free0: ``[K]`` bool, the start's free set.
    simplex: a Python bool: add the constraint ``sum(x) = 1``.
    budget: the iteration budget (default ``ACTIVE_SET_BUDGET(K)``).

  Returns:
    ``(x, free, iterations)``: the solution, its free set, and the number of
    iterations used (``budget`` if the budget ran out; ``x`` is then the last
    feasible iterate).
  """
  k = q.shape[0]
  dtype = q.dtype
  budget = ACTIVE_SET_BUDGET(k) if budget is None else budget
  tol = _tolerance(dtype)
  scale = jnp.maximum(jnp.max(jnp.abs(q)), jnp.max(jnp.abs(c)))

  def optimal_violation(x, free):
    grad = q @ x + c
    level = grad @ x if simplex else jnp.zeros([], dtype)  # simplex: the multiplier
    slack = grad - level
    room = tol * k * (scale * jnp.maximum(1, jnp.max(jnp.abs(x))) + 1e-30)
    candidates = ~free & (slack < -room)
    return jnp.any(candidates), jnp.argmin(jnp.where(candidates, slack, jnp.inf))

  def body(carry):
    x, free, _, it = carry
    z = _free_set_solution(q, c, free, simplex)
    z_room = tol * k * jnp.maximum(1, jnp.max(jnp.abs(z)))
    blocked = free & (z < -z_room)

    def accept():
      x_new = jnp.where(free & (z > 0), z, 0)
      free_new = free & (z > 0)
      more, j = optimal_violation(x_new, free_new)
      return x_new, free_new | ((jnp.arange(k) == j) & more), ~more

    def step_back():
      # Move from x toward z until the first blocked coordinate reaches 0.
      ratios = jnp.where(blocked, x / jnp.where(blocked, x - z, 1), jnp.inf)
      i = jnp.argmin(ratios)
      alpha = jnp.clip(ratios[i], 0, 1)
      x_new = x + alpha * (z - x)
      free_new = free & (x_new > 0) & (jnp.arange(k) != i)
      return jnp.where(free_new, x_new, 0), free_new, jnp.zeros([], bool)

    x_new, free_new, done = lax.cond(jnp.any(blocked), step_back, accept)
    return x_new, free_new, done, it + 1

  def cond(carry):
    _, _, done, it = carry
    return ~done & (it < budget)

  start = (x0.astype(dtype), free0, jnp.zeros([], bool), jnp.zeros([], jnp.int32))
  x, free, _, it = lax.while_loop(cond, body, start)
  return x, free, it


def min_norm_simplex(q, c=None):
  """``argmin_{x in simplex} x^T Q x / 2 + c^T x`` (``c = 0``: the min-norm
  point of the convex hull whose Gram matrix is ``Q``), from the best vertex."""
  k = q.shape[0]
  c = jnp.zeros([k], q.dtype) if c is None else c
  j = jnp.argmin(jnp.diag(q) / 2 + c)
  x0 = (jnp.arange(k) == j).astype(q.dtype)
  return active_set(q, c, x0, x0 > 0, simplex=True)[0]


def nonneg(q, c):
  """``argmin_{x >= 0} x^T Q x / 2 + c^T x``, from ``x = 0``."""
  k = q.shape[0]
  return active_set(q, c, jnp.zeros([k], q.dtype), jnp.zeros([k], bool), simplex=False)[0]
