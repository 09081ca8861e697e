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
solves the equality-constrained problem on the free set exactly. For small K
each step solves through the pseudo-inverse of its KKT matrix. From K = 16 on
for a batch of problems (``CARRY_FROM_K``), and K = 20 for one, the inverse of
the free block is carried from one iteration to the next instead, and updated
as one index enters (a bordered update) or leaves (a rank-one downdate), so an
iteration costs a few K x K matrix-vector products; each solve is refined once
against ``Q`` and its residual checked.
Where the block is not safely positive definite (its smallest eigenvalue near
the pseudo-inverse's cutoff: collinear or repeated gradients), where several
indices change at once, or where a residual fails, the inverse is rebuilt from
an eigendecomposition and the step solved through the pseudo-inverse of the
(symmetric) KKT matrix, so singular Gram matrices are handled; where both apply
they are the same exact inverse. The method ends in finitely many steps; it runs
in a ``lax.while_loop`` with a fixed budget, with no host round trip. Every
iterate is feasible. Tolerances are relative to the problem's scale
(``_tolerance``). Several problems on one matrix (UPGrad's K projections) are
solved as one batch, and the eigendecompositions run only in the iterations
where some problem needs them.
"""

import jax
from jax import lax
import jax.numpy as jnp

# Iterations of the active-set loop: k adds and at most as many removals per
# add are typical; 4 K + 8 leaves a wide margin (tests count them).
ACTIVE_SET_BUDGET = lambda k: 4 * k + 8  # noqa: E731

# From this K on, the active set carries the free block's inverse across its
# iterations: from CARRY_FROM_K for a batch of problems (UPGrad's K), from
# CARRY_SINGLE_FROM_K for one (MGDA, CAGrad, DualProj). Below it, each
# iteration's eigendecomposition of a matrix this small costs microseconds, and
# the simpler loop compiles in about half the time: at K = 16, one problem
# solves 0.1 to 0.3 ms slower without the carried inverse and compiles about
# 1 s faster; a batch of 16 solves 1 to 2.6 ms slower.
CARRY_FROM_K = 16
CARRY_SINGLE_FROM_K = 20


def _tolerance(dtype) -> jax.Array:
  return 64 * jnp.finfo(dtype).eps


def pinv_symmetric(m: jax.Array, rtol: jax.Array | float | None = None) -> jax.Array:
  """Pseudo-inverse of a symmetric matrix from its eigendecomposition.

  Eigenvalues with magnitude at most ``rtol`` times the largest count as zero
  (default: the size times the dtype's epsilon, as numpy's ``pinv``).
  """
  return _pinv_and_eigenvalues(m, rtol)[0]


def _pinv_and_eigenvalues(m, rtol=None):
  """:func:`pinv_symmetric` and the eigenvalues it was taken from."""
  n = m.shape[-1]
  if rtol is None:
    rtol = n * jnp.finfo(m.dtype).eps
  lam, vec = jnp.linalg.eigh(m)
  cutoff = rtol * jnp.max(jnp.abs(lam))
  keep = jnp.abs(lam) > cutoff
  inv = jnp.where(keep, 1 / jnp.where(keep, lam, 1), 0)
  return (vec * inv) @ vec.T, lam


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


def _solve_with(q, c, free, inv, simplex):
  """The solution of :func:`_free_set_solution` from ``inv``, the inverse of the
  free block padded with identity rows (``A_F``), with one step of iterative
  refinement against ``q`` itself; and whether its residual is within the
  solver's tolerance (an ``inv`` that has drifted from ``A_F^-1`` fails it)."""
  k = q.shape[0]
  dtype = q.dtype
  f = free.astype(dtype)

  def apply_inv(b):  # A_F^-1 b on the free coordinates, 0 elsewhere
    return (inv @ (b * f)) * f

  y = apply_inv(f) if simplex else None
  fy = f @ y if simplex else None

  def solve(b, level):  # [Q_FF, 1; 1, 0] [z; nu] = [b; level] (without 1: Q_FF z = b)
    u = apply_inv(b)
    if not simplex:
      return u, jnp.zeros([], dtype)
    nu = (f @ u - level) / jnp.where(fy > 0, fy, 1)
    return u - nu * y, nu

  def residuals(z, nu):
    r = -c * f - f * (q @ z) - (nu * f if simplex else 0)
    return r, (jnp.ones([], dtype) - f @ z if simplex else jnp.zeros([], dtype))

  z, nu = solve(-c * f, jnp.ones([], dtype))
  dz, dnu = solve(*residuals(z, nu))
  z, nu = z + dz, nu + dnu
  r, r_level = residuals(z, nu)
  size = jnp.max(jnp.abs(q)) * jnp.maximum(1, jnp.max(jnp.abs(z))) + jnp.max(jnp.abs(c))
  worst = jnp.maximum(jnp.max(jnp.abs(r)), jnp.abs(r_level))
  ok = jnp.isfinite(size) & (worst <= _tolerance(dtype) * k * size)
  if simplex:
    ok = ok & (fy > 0)
  return z, ok


def _stands(q, free, inv):
  """Whether ``inv`` may stand for the pseudo-inverse: the free block's smallest
  eigenvalue, at least ``1 / |A_F^-1|_F`` (its inverse's Frobenius norm over the
  free block), is above 4 times the pseudo-inverse's cutoff (``K + 1`` times
  epsilon times the largest eigenvalue, at most the trace), so the
  pseudo-inverse would keep every eigenvalue and both are one exact inverse."""
  f = free.astype(q.dtype)
  norm = jnp.sqrt(jnp.sum((jnp.outer(f, f) * inv) ** 2))
  return jnp.isfinite(norm) & (4 * _cutoff(q, f) * norm < 1)


def _cutoff(q, f):
  """The pseudo-inverse's cutoff on the free block (mask ``f``) bounded above:
  ``K + 1`` times epsilon times its trace (at least its largest eigenvalue)."""
  k = q.shape[0]
  return (k + 1) * jnp.finfo(q.dtype).eps * jnp.sum(f * jnp.diag(q))


def _rebuilt(q, free):
  """``A_F^-1`` from the eigendecomposition of the free block (the pseudo-inverse
  where it is singular, eigenvalues below ``(K + 1) eps`` of the largest
  counting as zero), and whether it stands: the block's smallest eigenvalue is
  above 4 times that cutoff (:func:`_stands` on the eigenvalues themselves).
  The fixed coordinates are padded with the largest diagonal entry, so that
  their eigenvalues neither set nor fall under the cutoff."""
  k = q.shape[0]
  dtype = q.dtype
  f = free.astype(dtype)
  both = jnp.outer(f, f)
  top = jnp.max(jnp.diag(q))
  pad = jnp.where(top > 0, top, 1)
  padded = both * q + jnp.diag((1 - f) * pad)
  inv, lam = _pinv_and_eigenvalues(padded, (k + 1) * jnp.finfo(dtype).eps)
  stands = jnp.all(jnp.isfinite(lam)) & (jnp.min(lam) > 4 * _cutoff(q, f))
  return both * inv + jnp.diag(1 - f), stands


def _updated(q, free, free_new, inv, valid):
  """``A_F^-1`` carried from ``free`` to ``free_new`` where they differ by one
  index: a bordered update when one enters, a rank-one downdate when one leaves
  (O(K^2), no factorisation); otherwise, or where the result would not stand,
  marked invalid (the next iteration rebuilds it)."""
  k = q.shape[0]
  dtype = q.dtype
  f = free.astype(dtype)
  added, removed = free_new & ~free, free & ~free_new
  n_added, n_removed = jnp.sum(added), jnp.sum(removed)
  j, i = jnp.argmax(added), jnp.argmax(removed)
  e_j, e_i = (jnp.arange(k) == j).astype(dtype), (jnp.arange(k) == i).astype(dtype)
  # One enters: [[A, b], [b^T, d]]^-1 = [[A^-1, 0], [0, 0]] + v v^T / s, v = [A^-1 b; -1].
  b = q[:, j] * f
  inv_b = inv @ b
  v = inv_b - e_j
  s = q[j, j] - b @ inv_b
  grown = inv - jnp.outer(e_j, e_j) + jnp.outer(v, v) / jnp.where(s > 0, s, 1)
  # One leaves: the Schur complement of its diagonal entry in the inverse.
  m = inv[:, i]
  pivot = m[i]
  shrunk = inv - jnp.outer(m, m) / jnp.where(pivot > 0, pivot, 1) + jnp.outer(e_i, e_i)
  grow = (n_added == 1) & (n_removed == 0)
  shrink = (n_added == 0) & (n_removed == 1)
  same = (n_added == 0) & (n_removed == 0)
  new = jnp.where(grow, grown, jnp.where(shrink, shrunk, inv))
  possible = same | (grow & (s > 0)) | (shrink & (pivot > 0))
  return new, valid & possible & _stands(q, free_new, new)


def start_inverse(q, free):
  """``A_F^-1`` of a start's free set where it is known without a factorisation,
  and whether it stands: the identity for an empty free set (UPGrad's start at
  0), ``1 / Q_jj`` on the diagonal for a single free index ``j`` (MGDA's start
  at a vertex) when ``Q_jj > 0``. Any other start is marked invalid and rebuilt
  at the first iteration. On a CPU the rebuild's eigendecomposition runs in the
  LAPACK that jax calls, whose threads can keep spinning for a while after it
  returns and slow the rest of a training step down, so the common starts avoid
  it."""
  k = q.shape[0]
  dtype = q.dtype
  count = jnp.sum(free)
  j = jnp.argmax(free)
  pivot = q[j, j]
  single = (count == 1) & (pivot > 0)
  inv = jnp.eye(k, dtype=dtype).at[j, j].set(jnp.where(single, 1 / jnp.where(single, pivot, 1), 1))
  valid = (count == 0) | (single & _stands(q, free, inv))
  return inv, valid


def _free_set_solutions(q, c, free, inv, valid, simplex):
  """:func:`_free_set_solution` for a batch of problems ``c``, ``free``
  (``[B, K]``) on one ``q``, from each problem's carried inverse ``inv``
  where it is valid and its solve checks out. Only when some problem's is not
  (the first iteration from a start with free indices, several indices leaving
  at once, a drifted or nearly singular block) does one ``lax.cond`` branch
  rebuild the inverses by an eigendecomposition (the pseudo-inverse of a
  singular block); with the simplex constraint, the pseudo-inverse of the KKT
  matrix then solves where a block is (nearly) singular.

  Returns ``(z, inv, valid)``."""
  fast, ok = jax.vmap(lambda cc, ff, mm: _solve_with(q, cc, ff, mm, simplex))(c, free, inv)
  ok = ok & valid

  def rebuild():
    inv_new, stands = jax.vmap(lambda ff: _rebuilt(q, ff))(free)
    z_new, z_ok = jax.vmap(lambda cc, ff, mm: _solve_with(q, cc, ff, mm, simplex))(c, free, inv_new)
    z = jnp.where(ok[:, None], fast, z_new)
    # Without the simplex the KKT matrix is the padded block and the constant 1:
    # its pseudo-inverse's solve is the rebuilt one's, singular or not, so only
    # the simplex QP needs the KKT pseudo-inverse where a block is (nearly) singular.
    if simplex:
      good = ok | (stands & z_ok)

      def exact():
        slow = jax.vmap(lambda cc, ff: _free_set_solution(q, cc, ff, simplex))(c, free)
        return jnp.where(good[:, None], z, slow)

      z = lax.cond(jnp.all(good), lambda: z, exact)
    return z, jnp.where(ok[:, None, None], inv, inv_new), ok | stands

  return lax.cond(jnp.all(ok), lambda: (fast, inv, valid), rebuild)


def carries(k: int, problems: int) -> bool:
  """Whether the active set carries the free block's inverse for ``problems``
  problems on one K x K matrix (``CARRY_FROM_K``, ``CARRY_SINGLE_FROM_K``)."""
  return k >= (CARRY_SINGLE_FROM_K if problems == 1 else CARRY_FROM_K)


def active_set(q, c, x0, free0, simplex, budget=None, carry=None, inverse0=()):
  """Solves the QP of the module docstring from a feasible start.

  Args:
    q: ``[K, K]`` symmetric positive semi-definite.
    c: ``[K]``, or ``[B, K]`` for B problems on the same ``q`` (solved
      together; each stops where it ends).
    x0: a feasible start shaped like ``c``, zero off ``free0``.
    free0: bool, shaped like ``c``: the start's free set.
    simplex: a Python bool: add the constraint ``sum(x) = 1``.
    budget: the iteration budget (default ``ACTIVE_SET_BUDGET(K)``).
    carry: a Python bool: carry the free block's inverse across iterations
      (default: from ``K = CARRY_FROM_K`` on for a batch of problems, from
      ``CARRY_SINGLE_FROM_K`` for one); otherwise each iteration solves through
      the pseudo-inverse of its KKT matrix. Both give the same steps.
    inverse0: with ``carry``, the start's carried inverse and whether it is
      valid, as an earlier call returned it for the free set ``free0``
      (warm starts: CAGrad's sequence of problems on one ``q``); ``()``:
      known only for a start with at most one free index, else rebuilt.

  Returns:
    ``(x, free, iterations, inverse)``, each with ``c``'s leading shape: the
    solution, its free set, the number of iterations used (``budget`` if the
    budget ran out; ``x`` is then the last feasible iterate), and with
    ``carry`` the carried inverse of that free set and whether it is valid
    (``()`` without).
  """
  k = q.shape[0]
  dtype = q.dtype
  budget = ACTIVE_SET_BUDGET(k) if budget is None else budget
  single = jnp.ndim(c) == 1
  if carry is None:
    carry = carries(k, 1 if single else jnp.shape(c)[0])
  tol = _tolerance(dtype)
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

  def body(state):
    x, free, done, it, inverse = state
    if carry:
      z, inv, valid = _free_set_solutions(q, c, free, *inverse, simplex)
    else:
      z = jax.vmap(lambda cc, ff: _free_set_solution(q, cc, ff, simplex))(c, free)
    x_new, free_new, done_new = jax.vmap(step)(x, free, z, c, scale)
    frozen = done[:, None]
    if carry:
      inv_new, valid_new = jax.vmap(lambda f, fn, m, v: _updated(q, f, fn, m, v))(
        free, free_new, inv, valid
      )
      inverse = (jnp.where(frozen[..., None], inv, inv_new), jnp.where(done, valid, valid_new))
    return (
      jnp.where(frozen, x, x_new),
      jnp.where(frozen, free, free_new),
      done | done_new,
      it + (~done).astype(jnp.int32),
      inverse,
    )

  def cond(state):
    _, _, done, it, _ = state
    return ~jnp.all(done) & (jnp.max(it) < budget)

  batch = c.shape[0]
  if not carry:
    inverse = ()
  elif not inverse0:
    inverse = jax.vmap(lambda f: start_inverse(q, f))(free0)
  else:
    inverse = tuple(a[None] for a in inverse0) if single else inverse0
  start = (
    x0.astype(dtype),
    free0,
    jnp.zeros([batch], bool),
    jnp.zeros([batch], jnp.int32),
    inverse,
  )
  x, free, _, it, inverse = lax.while_loop(cond, body, start)
  if single:
    return x[0], free[0], it[0], tuple(a[0] for a in inverse)
  return x, free, it, inverse


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
