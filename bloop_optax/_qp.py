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
solves the equality-constrained problem on the free set exactly. The solve
takes a Cholesky factor of the free block where that block is safely positive
definite, and otherwise the pseudo-inverse of the (symmetric) KKT matrix, so
singular Gram matrices (collinear or repeated gradients) are handled; where
both apply they are the same exact inverse. The method ends in finitely many
steps; it runs in a ``lax.while_loop`` with a fixed budget, with no host round
trip. Every iterate is feasible. Tolerances are relative to the problem's
scale (``_tolerance``). Several problems on one matrix (UPGrad's K
projections) are solved as one batch, so the pseudo-inverse is computed only
in the iterations where some problem needs it.
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
  padded with identity rows for the fixed coordinates, through its
  pseudo-inverse (any ``Q_FF``, singular included)."""
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


def _cholesky_solution(q, c, free, simplex):
  """The solution of :func:`_free_set_solution` through a Cholesky factor of
  the free block, and whether it stands for it.

  It stands when the block is positive definite with its smallest eigenvalue
  above the pseudo-inverse's cutoff (``K + 1`` times the dtype's epsilon times
  the largest eigenvalue), so that the pseudo-inverse would keep every
  eigenvalue and both are the same exact inverse. The smallest eigenvalue is
  bounded below by ``1 / |L^-1|_F^2`` and the largest above by the trace.
  Where it does not stand, the caller takes the pseudo-inverse.
  """
  k = q.shape[0]
  dtype = q.dtype
  f = free.astype(dtype)
  both = jnp.outer(f, f)
  # The fixed coordinates are padded with identity rows: no entry couples them
  # to the free ones, so neither the factor nor its inverse does either.
  low = jnp.linalg.cholesky(both * q + jnp.diag(1 - f))
  inv_low = jax.scipy.linalg.solve_triangular(low, jnp.eye(k, dtype=dtype), lower=True)
  bound = jnp.sum(both * inv_low**2)  # >= 1 / smallest eigenvalue of Q_FF
  cutoff = (k + 1) * jnp.finfo(dtype).eps * jnp.sum(f * jnp.diag(q))
  ok = jnp.isfinite(bound) & (4 * cutoff * bound < 1)
  inv_low = jnp.where(ok, inv_low, 0) * f[None, :]

  def apply_inv(b):  # Q_FF^-1 b on the free coordinates, 0 elsewhere
    return (inv_low @ b) @ inv_low

  def solve(b, level):  # [Q_FF, 1; 1, 0] [z; nu] = [b; level] (without 1: Q_FF z = b)
    u = apply_inv(b)
    if not simplex:
      return u, jnp.zeros([], dtype)
    y = apply_inv(f)
    nu = (f @ u - level) / jnp.where(ok, f @ y, 1)
    return u - nu * y, nu

  z, nu = solve(-c * f, jnp.ones([], dtype))
  # One step of iterative refinement, as in the pseudo-inverse's solve.
  residual = -c * f - f * (q @ z) - (nu * f if simplex else 0)
  dz, _ = solve(residual, jnp.ones([], dtype) - f @ z if simplex else jnp.zeros([], dtype))
  return z + dz, ok


def _free_set_solutions(q, c, free, simplex):
  """:func:`_free_set_solution` for a batch of problems ``c``, ``free``
  (``[B, K]``) on one ``q``: Cholesky factors, and the pseudo-inverse only
  when some problem's free block is (nearly) singular."""
  fast, ok = jax.vmap(lambda cc, ff: _cholesky_solution(q, cc, ff, simplex))(c, free)

  def exact():
    slow = jax.vmap(lambda cc, ff: _free_set_solution(q, cc, ff, simplex))(c, free)
    return jnp.where(ok[:, None], fast, slow)

  return lax.cond(jnp.all(ok), lambda: fast, exact)


def active_set(q, c, x0, free0, simplex, budget=None):
  """Solves the QP of the module docstring from a feasible start.

  Args:
    q: ``[K, K]`` symmetric positive semi-definite.
    c: ``[K]``, or ``[B, K]`` for B problems on the same ``q`` (solved
      together; each stops where it ends).
    x0: a feasible start shaped like ``c``, zero off ``free0``.
    free0: bool, shaped like ``c``: the start's free set.
    simplex: a Python bool: add the constraint ``sum(x) = 1``.
    budget: the iteration budget (default ``ACTIVE_SET_BUDGET(K)``).

  Returns:
    ``(x, free, iterations)``, each with ``c``'s leading shape: the solution,
    its free set, and the number of iterations used (``budget`` if the budget
    ran out; ``x`` is then the last feasible iterate).
  """
  k = q.shape[0]
  dtype = q.dtype
  budget = ACTIVE_SET_BUDGET(k) if budget is None else budget
  tol = _tolerance(dtype)
  single = jnp.ndim(c) == 1
  c, x0, free0 = (jnp.atleast_2d(a) for a in (c, x0, free0))
  scale = jnp.maximum(jnp.max(jnp.abs(q)), jnp.max(jnp.abs(c), axis=1))  # [B]

  def optimal_violation(x, free, c, scale):
    grad = q @ x + c
    level = grad @ x if simplex else jnp.zeros([], dtype)  # simplex: the multiplier
    slack = grad - level
    room = tol * k * (scale * jnp.maximum(1, jnp.max(jnp.abs(x))) + 1e-30)
    candidates = ~free & (slack < -room)
    return jnp.any(candidates), jnp.argmin(jnp.where(candidates, slack, jnp.inf))

  def step(x, free, z, c, scale):
    z_room = tol * k * jnp.maximum(1, jnp.max(jnp.abs(z)))
    blocked = free & (z < -z_room)

    def accept():
      x_new = jnp.where(free & (z > 0), z, 0)
      free_new = free & (z > 0)
      more, j = optimal_violation(x_new, free_new, c, scale)
      return x_new, free_new | ((jnp.arange(k) == j) & more), ~more

    def step_back():
      # Move from x toward z until the first blocked coordinate reaches 0.
      ratios = jnp.where(blocked, x / jnp.where(blocked, x - z, 1), jnp.inf)
      i = jnp.argmin(ratios)
      alpha = jnp.clip(ratios[i], 0, 1)
      x_new = x + alpha * (z - x)
      free_new = free & (x_new > 0) & (jnp.arange(k) != i)
      return jnp.where(free_new, x_new, 0), free_new, jnp.zeros([], bool)

    return lax.cond(jnp.any(blocked), step_back, accept)

  def body(carry):
    x, free, done, it = carry
    z = _free_set_solutions(q, c, free, simplex)
    x_new, free_new, done_new = jax.vmap(step)(x, free, z, c, scale)
    x = jnp.where(done[:, None], x, x_new)
    free = jnp.where(done[:, None], free, free_new)
    return x, free, done | done_new, it + (~done).astype(jnp.int32)

  def cond(carry):
    _, _, done, it = carry
    return ~jnp.all(done) & (jnp.max(it) < budget)

  batch = c.shape[0]
  start = (
    x0.astype(dtype),
    free0,
    jnp.zeros([batch], bool),
    jnp.zeros([batch], jnp.int32),
  )
  x, free, _, it = lax.while_loop(cond, body, start)
  return (x[0], free[0], it[0]) if single else (x, free, it)


def min_norm_simplex(q, c=None):
  """``argmin_{x in simplex} x^T Q x / 2 + c^T x`` (``c = 0``: the min-norm
  point of the convex hull whose Gram matrix is ``Q``), from the best vertex."""
  k = q.shape[0]
  c = jnp.zeros([k], q.dtype) if c is None else c
  j = jnp.argmin(jnp.diag(q) / 2 + c)
  x0 = (jnp.arange(k) == j).astype(q.dtype)
  return active_set(q, c, x0, x0 > 0, simplex=True)[0]


def nonneg(q, c):
  """``argmin_{x >= 0} x^T Q x / 2 + c^T x``, from ``x = 0``; ``c`` may be a
  batch ``[B, K]`` of problems on the same ``q``."""
  zeros = jnp.zeros(jnp.shape(c), q.dtype)
  return active_set(q, c, zeros, zeros > 0, simplex=False)[0]
