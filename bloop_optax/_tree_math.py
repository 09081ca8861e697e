"""Global inner products over pytrees, and the scalar maths built on them.

This module is the one place the package reduces over gradients: Bloop, the
baselines, PCD, the hierarchy and every aggregator take their inner products
through :func:`safe_dots` (any pairs of trees) or :func:`gram` (all pairs).

Every inner product is ONE sum over all the leaves of a pytree, taken leaf by
leaf (a local reduction per leaf, then a sum of scalars), accumulated in at
least float32. Leaves are never concatenated, so a sharded tree reduces
locally and only scalars (or, in the stacked form, the K x K matrix) cross
devices. For a few trees (at most ``MAX_TREES_PAIRWISE``, and at most
``MAX_PAIRWISE_REDUCTIONS`` per-leaf reductions) the sums are one
multiply-and-reduce per pair and leaf (memory speed, no temporary); otherwise
one product of the K stacked leaves per leaf (a compile time that grows with
the leaves, not with the pairs; a temporary as large as the K trees, except on
a single CPU device, where a large leaf is stacked and multiplied a cache-sized
block at a time).

Float32 sums of squares overflow for norms above about 1.8e19. Rather than
return a finite but wrong coefficient, when a fast sum is not finite ONE
``lax.cond`` branch (which costs nothing when it is not taken) rescales every
leaf by a power of two, recomputes the sums in the same form exactly, and
returns them with their binary exponents. Ratios of inner products then come
out exact whatever the scale of the gradients.
"""

from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def wide(*dtypes: Any) -> jnp.dtype:
  """The widest of ``dtypes`` and float32 (explicit, so strict promotion holds)."""
  return max((jnp.dtype(d) for d in (jnp.float32, *dtypes)), key=lambda d: d.itemsize)


def acc_dtype(dtype: Any, accumulator_dtype: Any) -> jnp.dtype:
  """The dtype of an accumulator for params of ``dtype``."""
  if accumulator_dtype is not None:
    return jnp.dtype(accumulator_dtype)
  return wide(dtype)


def zeros_accumulator(params: PyTree, accumulator_dtype: Any = None) -> PyTree:
  """Zeros shaped (and sharded) like ``params``, in the accumulator dtype."""
  return jax.tree.map(
    lambda p: jnp.zeros_like(p, dtype=acc_dtype(p.dtype, accumulator_dtype)), params
  )


def _leaf_dot(x: jax.Array, y: jax.Array) -> jax.Array:
  # A multiply-and-reduce in the wide dtype: exact float32 (or wider) products
  # on every backend (a library dot may round its inputs to TF32 or bfloat16 on
  # accelerators); XLA:CPU turns it into its own vectorised dot.
  dtype = wide(x.dtype, y.dtype)
  return jnp.sum(x.astype(dtype) * y.astype(dtype))


def _global(x: PyTree, y: PyTree) -> jax.Array:
  dots = jax.tree.leaves(jax.tree.map(_leaf_dot, x, y))
  dtype = wide(*(d.dtype for d in dots))
  return sum((d.astype(dtype) for d in dots), jnp.zeros((), dtype))


def tree_dots(*pairs: tuple[PyTree, PyTree]) -> jax.Array:
  r"""Global inner products :math:`\langle x, y\rangle` for each pair, as one vector.

  Each is one sum over every leaf of a multiply-and-reduce, accumulated in at
  least float32.
  """
  values = [_global(x, y) for x, y in pairs]
  dtype = wide(*(v.dtype for v in values))
  return jnp.stack([v.astype(dtype) for v in values])


def tree_dot(x: PyTree, y: PyTree) -> jax.Array:
  r"""The global inner product :math:`\langle x, y\rangle` of two pytrees (real leaves).

  :math:`\langle x, y\rangle = \sum_{\text{leaves } l} \sum_i x_{l,i}\, y_{l,i}`: one sum over
  every leaf, accumulated in at least float32.

  Args:
    x: a pytree of arrays.
    y: a pytree with the structure and leaf shapes of ``x``.

  Returns:
    A scalar: the sum over leaves of ``vdot(x_leaf, y_leaf)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import bloop_optax
    >>> bloop_optax.tree_dot({"a": jnp.ones(2), "b": jnp.ones(())},
    ...                      {"a": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)})
    Array(6., dtype=float32)
  """
  return tree_dots((x, y))[0]


def ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den`` for a squared norm ``den``, taken as 0 where ``den <= 0``.

  The zero-norm rule of the projection. A squared norm is never negative;
  ``<= 0`` also covers a Gram-Schmidt residual norm that rounding pushed just
  below 0.
  """
  positive = den > 0
  return jnp.where(positive, num / jnp.where(positive, den, 1), 0)


def cosine(ma: jax.Array, mm: jax.Array, aa: jax.Array) -> jax.Array:
  """``ma / (sqrt(mm) sqrt(aa))`` as float32, 0 when either norm is 0."""
  return ratio(ma, jnp.sqrt(mm) * jnp.sqrt(aa)).astype(jnp.float32)


# Many trees (K task gradients) of many small leaves (K task heads): a leaf of
# at most this many elements is handled as one array of its K stacked copies
# (one stack and one reduction instead of K elementwise operations: tracing and
# the program grow as the leaves, not as K times the leaves).
SMALL_LEAF = 1 << 14
MIN_TREES_STACKED = 9


def stack_small(xs: Sequence[jax.Array]) -> bool:
  return len(xs) >= MIN_TREES_STACKED and xs[0].size <= SMALL_LEAF


def distinct(xs: Sequence[Any]) -> tuple[list[Any], list[list[int]]]:
  """The distinct objects of ``xs`` (by identity) and where each occurs.

  :func:`bloop_optax.value_and_grads` gives every loss's gradient the same zero
  array at the leaves it does not depend on (a task head of another task);
  reading such a leaf once instead of once per loss keeps the program from
  growing as K^2.
  """
  index: dict[int, int] = {}
  unique, where = [], []
  for n, x in enumerate(xs):
    i = index.setdefault(id(x), len(unique))
    if i == len(unique):
      unique.append(x)
      where.append([])
    where[i].append(n)
  return unique, where


def linear_combination(coefs: Sequence[jax.Array], trees: Sequence[PyTree]) -> PyTree:
  """``sum_i coefs[i] * trees[i]`` leaf by leaf, in the dtype of ``trees[0]``.

  One elementwise expression per leaf, which XLA fuses into whatever consumes
  it (e.g. an optimizer's moment updates), so it is never stored. An array
  that several trees share (the same object) is read once, with the sum of
  its coefficients.
  """

  coef_vectors: dict[Any, jax.Array] = {}  # the coefficients as one array, per dtype

  def total(w, dtype):
    """The sum of the coefficients at ``w``; where there are many (the zeros
    that K - 1 tasks share at a head), one masked sum of all of them, so that
    the program does not grow as K^2 with K task heads."""
    if len(w) == 1:
      return coefs[w[0]].astype(dtype)
    if len(w) == 2:
      return sum(coefs[n].astype(dtype) for n in w)
    if dtype not in coef_vectors:
      coef_vectors[dtype] = jnp.stack([c.astype(dtype) for c in coefs])
    mask = np.zeros(len(coefs), dtype)
    mask[w] = 1
    return jnp.sum(coef_vectors[dtype] * mask)

  def leaf(*xs):
    dtype = wide(*(x.dtype for x in xs))
    unique, where = distinct(xs)
    weights = [total(w, dtype) for w in where]
    if stack_small(unique):
      stacked = jnp.stack([x.astype(dtype) for x in unique])
      shape = (-1,) + (1,) * xs[0].ndim
      return jnp.sum(jnp.stack(weights).reshape(shape) * stacked, axis=0).astype(xs[0].dtype)
    out = weights[0] * unique[0].astype(dtype)
    for c, x in zip(weights[1:], unique[1:], strict=True):
      out = out + c * x.astype(dtype)
    return out.astype(xs[0].dtype)

  return jax.tree.map(leaf, *trees)


def ema_update(ema: PyTree, grads: PyTree, decay: jax.Array, keep: jax.Array) -> PyTree:
  """``decay * ema + (1 - decay) * grads`` leaf by leaf in the EMA's dtype, or
  ``ema`` unchanged where ``keep`` is false (a step that must not enter it)."""

  def leaf(e, g):
    b = decay.astype(e.dtype)
    return jnp.where(keep, b * e + (1 - b) * g.astype(e.dtype), e)

  return jax.tree.map(leaf, ema, grads)


def projection_coef(dots) -> jax.Array:
  """``<P, A> / <P, P>`` from ``safe_dots([P, A], [(0, 1), (0, 0)])``."""
  return scaled_ratio(dots.values[0], dots.values[1], dots.exps[1] - dots.exps[0])


def matrix_from_pairs(values, pairs, shape, symmetric=False) -> jax.Array:
  """The dense matrix with ``values[n]`` at ``pairs[n]`` (and at its mirror
  with ``symmetric``), zeros elsewhere.

  Built from static indices (slices and a stack), never a scatter: some JAX
  versions cannot shard a scatter on an explicit mesh, even of scalars.
  """
  position = {pair: n for n, pair in enumerate(pairs)}
  if symmetric:
    position.update({(j, i): n for (i, j), n in list(position.items())})
  zero = jnp.zeros((), values.dtype)

  def entry(i, j):
    return values[position[(i, j)]] if (i, j) in position else zero

  rows, cols = shape
  return jnp.stack([jnp.stack([entry(i, j) for j in range(cols)]) for i in range(rows)])


# ---------------------------------------------------------------- overflow


class Dots(NamedTuple):
  """Inner products, exact at any scale: ``<X_i, X_j> = value * 2**(e_i + e_j)``.

  Attributes:
    values: the inner products of the rescaled trees ``X_i / 2**e_i``, one per
      requested pair.
    exps: int32 binary exponent ``e_i`` of each tree (all 0 on the fast path).
    finite: whether every tree is finite (no NaN, no Inf).
  """

  values: jax.Array
  exps: jax.Array
  finite: jax.Array


def _exponent(m: jax.Array) -> jax.Array:
  """``e`` with ``m = f * 2**e``, ``f`` in [0.5, 1); 0 for a zero or non-finite
  ``m``."""
  _, e = jnp.frexp(m)
  return jnp.where(jnp.isfinite(m) & (m > 0), e, 0).astype(jnp.int32)


def _scale_factors(e: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
  """Two powers of two whose product is ``2**-e``, neither subnormal (which a
  flush-to-zero backend would read as 0), so scaling by them is exact."""
  half = e // 2
  one = jnp.ones((), dtype)
  return jnp.ldexp(one, -half), jnp.ldexp(one, half - e)


# The pairwise form (one multiply-and-reduce per pair and leaf: memory speed,
# no parameter-sized temporary) compiles in a time that grows with the pairs
# (K^2) times the leaves, and so does its overflow branch (a reduction per pair
# and leaf with its own scale factors). It is taken for at most this many
# trees and per-leaf reductions; otherwise each leaf's K stacked copies are
# one full-precision product (a compile time that grows with the leaves only,
# a temporary as large as the K trees).
MAX_TREES_PAIRWISE = 4
MAX_PAIRWISE_REDUCTIONS = 4096


def _pairwise_rescaled(per_leaf, pairs, dtype, scales) -> jax.Array:
  """:func:`tree_dots` of the pairs with every leaf rescaled: one
  multiply-and-reduce per pair and leaf, summed over the leaves.

  ``scales``: :func:`_leaf_scales`' three ``[K, leaves]`` factors (leaf ``n`` of
  tree ``i`` is read as ``x * a[i, n] * b[i, n]``, an exact rescaling, and its
  products brought back by ``back``). They pass through an optimization
  barrier per pair, so XLA sees opaque scalars and fuses each scaling into its
  reduction instead of storing a scaled copy of a leaf that several pairs read.
  """
  values = []
  for i, j in pairs:
    total = jnp.zeros((), dtype)
    factors = lax.optimization_barrier(tuple(f[m] for f in scales for m in (i, j)))
    for n, xs in enumerate(per_leaf):
      w = wide(xs[i].dtype, xs[j].dtype)
      x, y = xs[i].astype(w), xs[j].astype(w)
      a_i, a_j, b_i, b_j, back_i, back_j = (f[n].astype(w) for f in factors)
      part = jnp.sum((x * a_i * b_i) * (y * a_j * b_j)) * back_i * back_j
      total = total.astype(wide(total.dtype, part.dtype)) + part
    values.append(total)
  return jnp.stack([v.astype(dtype) for v in values])


def _stacked(per_leaf, pairs, k, dtype, scales=None) -> jax.Array:
  """The requested entries of the K x K Gram matrix, as one full-precision
  product of the K stacked leaves per leaf (on one CPU device a large leaf is
  stacked a block at a time, see :func:`_blockwise_product`; otherwise the
  stacked leaves are a temporary as large as the K trees). ``scales`` as in
  :func:`_pairwise_rescaled`."""
  total = jnp.zeros((k, k), dtype)
  for n, xs in enumerate(per_leaf):
    w = wide(*(x.dtype for x in xs))
    factors = None if scales is None else tuple(f[:, n].astype(w) for f in scales)
    if _takes_blocks(k, xs[0].size):
      part = _blockwise_product(xs, w, factors)
    else:
      part = _self_product(_stack_scaled(xs, w, factors)).astype(w)
    if factors is not None:
      back = factors[2]
      part = part * back[:, None] * back[None, :]
    total = total.astype(wide(total.dtype, w)) + part
  if pairs is None:  # the whole matrix
    return total
  return jnp.stack([total[i, j] for i, j in pairs])


def _leaf_scales(leaf_exps: jax.Array, tree_exps: jax.Array, dtype: Any):
  """For leaf exponents ``[K, leaves]``: ``a * b = 2**-e_leaf`` (neither
  subnormal) and ``back = 2**(e_leaf - e_tree) <= 1``, all exact powers of two."""
  a, b = _scale_factors(leaf_exps, dtype)
  back = jnp.ldexp(jnp.ones((), dtype), leaf_exps - tree_exps[:, None])
  return a, b, back


def safe_dots(
  trees: Sequence[PyTree],
  pairs: Sequence[tuple[int, int]],
  skip_slow: jax.Array | bool = False,
) -> Dots:
  """Inner products ``<trees[i], trees[j]>`` for ``(i, j)`` in ``pairs``, exact at any scale.

  The one place the package takes global inner products of gradients. The
  ordinary path is float32 (or wider) sums: one multiply-and-reduce per pair
  and leaf for a few trees (see ``MAX_TREES_PAIRWISE``), else one product of the
  stacked leaves per leaf. Only when a sum is not finite does ONE ``lax.cond``
  branch find out why: it reads the largest magnitude of every leaf, so NaN
  and Inf inputs are told apart from sums that overflowed, scales each leaf by
  a power of two (an exact operation) and takes the same form of sums again.
  Then ``<X_i, X_j> = values * 2**(e_i + e_j)`` holds at any scale, and
  ``finite`` says whether the inputs were finite.

  Args:
    trees: the pytrees (same structure and leaf shapes).
    pairs: index pairs into ``trees``.
    skip_slow: a boolean scalar; where true the slow path is not taken (e.g.
      when the inputs are already known not to be finite).

  Returns:
    :class:`Dots`.
  """
  return _inner(trees, [tuple(p) for p in pairs], skip_slow)


def _inner(trees, pairs, skip_slow) -> Dots:
  """:func:`safe_dots`, or with ``pairs=None`` the K x K Gram matrix."""
  k = len(trees)
  count = k * (k + 1) // 2 if pairs is None else len(pairs)
  per_leaf = list(zip(*(jax.tree.leaves(t) for t in trees), strict=True))
  pairwise = k <= MAX_TREES_PAIRWISE and count * len(per_leaf) <= MAX_PAIRWISE_REDUCTIONS
  dtype = wide(*(x.dtype for xs in per_leaf for x in xs))
  if pairwise and pairs is None:  # the upper triangle's sums, mirrored afterwards
    upper = upper_pairs(k)
    dots = _inner(trees, upper, skip_slow)
    return dots._replace(values=matrix_from_pairs(dots.values, upper, (k, k), symmetric=True))

  if pairwise:
    fast = tree_dots(*((trees[i], trees[j]) for i, j in pairs))
  else:
    fast = _stacked(per_leaf, pairs, k, dtype)

  def fast_path():
    return Dots(fast, jnp.zeros([k], jnp.int32), jnp.ones([], bool))

  def slow_path():
    return _rescaled(per_leaf, pairs, k, dtype, pairwise)

  overflow = ~jnp.all(jnp.isfinite(fast)) & ~jnp.asarray(skip_slow)
  return lax.cond(overflow, slow_path, fast_path)


def _rescaled(per_leaf, pairs, k, dtype, pairwise) -> Dots:
  """The overflow path of :func:`safe_dots`: every leaf scaled by a power of two
  from its own largest magnitude, each tree's exponent the largest of its
  leaves'. NaN values (and ``finite`` false) when an input is not finite.
  ``dtype`` is the widest of the leaves' dtypes and float32."""
  if per_leaf:  # [K, leaves]
    maxima = jnp.stack([_leaf_maxima(xs, dtype) for xs in per_leaf], axis=1)
  else:  # trees without leaves: one zero column
    maxima = jnp.zeros([k, 1], dtype)
  finite = jnp.all(jnp.isfinite(maxima))
  leaf_exps = _exponent(maxima)
  tree_exps = jnp.max(leaf_exps, axis=1)
  scales = _leaf_scales(leaf_exps, tree_exps, dtype)
  if pairwise:
    values = _pairwise_rescaled(per_leaf, pairs, dtype, scales)
  else:  # the requested pairs, or with pairs=None the K x K matrix
    values = _stacked(per_leaf, pairs, k, dtype, scales)
  return Dots(jnp.where(finite, values, jnp.nan), tree_exps, finite)


def _leaf_maxima(xs, dtype) -> jax.Array:
  """``[K]``: the largest magnitude of one leaf of each of the K trees (an array
  several trees share reduced once). On one CPU device, the distinct arrays'
  maxima of a leaf of at least two blocks are taken together, a cache-sized
  block of each at a time (as :func:`_blockwise_product` reads them), and
  many copies of a small leaf (:func:`stack_small`) are stacked and reduced at
  once: one operation rather than one reduction per tree, whose count made
  this rarely taken branch compile in longer than the ordinary one. Otherwise
  each is a scalar (no temporary; across devices only scalars are
  all-reduced)."""
  unique, where = distinct(xs)
  if len(unique) > 1 and _takes_blocks(len(unique), xs[0].size):
    maxima = _blockwise_maxima(unique, dtype)
  elif _blockwise_here() and stack_small(unique):
    maxima = _row_maxima(unique, dtype)
  else:
    maxima = jnp.stack([jnp.max(jnp.abs(x), initial=0).astype(dtype) for x in unique])
  if len(unique) == len(xs):  # distinct keeps the order
    return maxima
  owner = {n: i for i, ns in enumerate(where) for n in ns}
  return maxima[np.array([owner[n] for n in range(len(xs))])]


def _row_maxima(xs, dtype) -> jax.Array:
  """``[len(xs)]``: the largest magnitude of each array ``xs`` (one shape), as
  ``dtype``, from their stacked copies."""
  return jnp.max(jnp.abs(jnp.stack([x.reshape(-1) for x in xs])).astype(dtype), axis=1, initial=0)


def _blockwise_maxima(xs, dtype) -> jax.Array:
  """:func:`_row_maxima`, a block of each array at a time."""

  def step(maxima, block):
    return jnp.maximum(maxima, _row_maxima(block, dtype))

  return _fold_blocks(xs, step, jnp.zeros([len(xs)], dtype))


def scaled_ratio(num: jax.Array, den: jax.Array, exp: jax.Array) -> jax.Array:
  """``(num / den) * 2**exp`` with the zero-norm rule of :func:`ratio`."""
  r = ratio(num, den)
  return jnp.ldexp(r, exp.astype(jnp.int32))


def all_finite(trees: Sequence[PyTree]) -> jax.Array:
  """Whether every element of every tree is finite: one max-magnitude reduction
  per leaf (never misled by an overflowing sum), an array that several trees
  share read once; with many trees, one per small leaf's stacked copies."""
  per_leaf = list(zip(*(jax.tree.leaves(t) for t in trees), strict=True))
  checks = []
  for xs in per_leaf:
    xs, _ = distinct(xs)
    if stack_small(xs):
      dtype = wide(*(x.dtype for x in xs))
      checks.append(jnp.isfinite(jnp.max(jnp.abs(jnp.stack([x.astype(dtype) for x in xs])))))
    else:
      checks += [jnp.isfinite(jnp.max(jnp.abs(x), initial=0)) for x in xs]
  return jnp.all(jnp.stack(checks)) if checks else jnp.ones([], bool)


# A block of the K stacked leaves is about this many bytes of float32 (it stays
# in a core's cache while its product is taken), and at least MIN_BLOCK elements
# of each leaf.
BLOCK_BYTES = 1 << 19
MIN_BLOCK = 1024
SPLIT_ABOVE_K = 8


def _block_size(k: int) -> int:
  return max(MIN_BLOCK, BLOCK_BYTES // (4 * k))


def _blockwise_here() -> bool:
  """Whether the program is traced for one CPU device. There, stacking a large
  leaf's K copies (a concatenation that XLA:CPU writes at a fraction of memory
  speed) and multiplying the ``[K, n]`` result (one long product whose output
  is too small to split across cores) costs several times the products of
  cache-sized blocks. On accelerators one stacked product is fastest, and
  across devices slicing a sharded leaf would gather it."""
  return jax.default_backend() == "cpu" and jax.device_count() == 1


def _takes_blocks(k: int, size: int) -> bool:
  """Whether a leaf of ``size`` elements of K trees is read a block at a time:
  on one CPU device, when it holds at least two blocks (and int32 offsets)."""
  return _blockwise_here() and 2 * _block_size(k) <= size < 2**31


def _fold_blocks(xs, step, init):
  """``step(carry, block)`` over the arrays ``xs`` (one shape) flattened, a
  cache-sized block of each at a time (``block``: one slice of each, in a
  ``fori_loop``), then over the rest of their elements as one last block."""
  size = _block_size(len(xs))
  flat = [x.reshape(-1) for x in xs]
  count = flat[0].size // size
  done = count * size

  def body(i, carry):
    start = i * size
    return step(carry, [lax.dynamic_slice(x, (start,), (size,)) for x in flat])

  carry = lax.fori_loop(0, count, body, init)
  if done < flat[0].size:
    carry = step(carry, [x[done:] for x in flat])
  return carry


def _stack_scaled(xs, w, factors) -> jax.Array:
  """The arrays ``xs`` as ``w``, stacked, each scaled by its ``a`` then its ``b``
  (``factors``, as in :func:`_pairwise_rescaled`; ``None``: not scaled)."""
  stacked = jnp.stack([x.astype(w) for x in xs])
  if factors is not None:
    shape = (len(xs),) + (1,) * (stacked.ndim - 1)
    stacked = stacked * factors[0].reshape(shape) * factors[1].reshape(shape)
  return stacked


def _blockwise_product(xs, w, factors) -> jax.Array:
  """:func:`_self_product` of the K leaves ``xs`` stacked, without stacking
  them whole: a loop over blocks of their flattened elements stacks one block
  of each (``[K, block]``, cache-sized) and accumulates its product; the rest
  of the elements is one last block. ``factors``: ``(a, b, back)`` as in
  :func:`_pairwise_rescaled` (each block is scaled by ``a`` then ``b``; the
  caller applies ``back``), or ``None``.

  With more than ``SPLIT_ABOVE_K`` trees a block's product is taken in the
  three parts of a symmetric matrix: the diagonal blocks of the first ``top``
  trees (a multiple of 8, at least K / 2) and of the rest, and the block
  between them. That is about three quarters of the full product's
  multiplications, and XLA:CPU's kernels for rows in multiples of 8 run
  these parts faster per multiplication too (the K = 12 to 64 Gram matrix of
  a 64 -> 512 -> 512 trunk in 0.46 to 0.89 of the time). The parts are
  accumulated apart and joined once.
  """
  k = len(xs)
  top = 8 * -(-k // 16) if k > SPLIT_ABOVE_K else k

  def step(totals, block):
    stacked = _stack_scaled(block, w, factors)
    first, rest = stacked[:top], stacked[top:]
    pairs = ((stacked, stacked),) if top == k else ((first, first), (first, rest), (rest, rest))
    parts = (_cross_product(a, b).astype(w) for a, b in pairs)
    return tuple(t + p for t, p in zip(totals, parts, strict=True))

  shapes = [(k, k)] if top == k else [(top, top), (top, k - top), (k - top, k - top)]
  totals = _fold_blocks(xs, step, tuple(jnp.zeros(s, w) for s in shapes))
  if top == k:
    return totals[0]
  first, cross, rest = totals
  return jnp.block([[first, cross], [cross.T, rest]])


def _cross_product(a: jax.Array, b: jax.Array) -> jax.Array:
  """``a @ b.T`` of two ``[n, m]`` blocks at full precision."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST)


def _self_product(stacked: jax.Array) -> jax.Array:
  """``stacked @ stacked.T`` over every axis but the first, at full precision.

  A matrix product of ``[K, n]`` (XLA:CPU contracts two axes of a 3-D array at
  about half the speed): the leaf is flattened unless its sharding forbids it.
  On an explicit mesh a product over sharded axes must be told its output's
  sharding: the K x K result is replicated (its partial sums all-reduced)."""
  if stacked.ndim > 2:
    try:
      stacked = stacked.reshape(stacked.shape[0], -1)
    except Exception as err:  # an explicitly sharded leaf that cannot be flattened
      if "shard" not in str(err).lower():
        raise
  axes = tuple(range(1, stacked.ndim))
  numbers = ((axes, axes), ((), ()))
  try:
    return lax.dot_general(stacked, stacked, numbers, precision=lax.Precision.HIGHEST)
  except Exception as err:  # jax's ShardingTypeError, whose home moved between versions
    if "out_sharding" not in str(err):
      raise
    replicated = jax.sharding.PartitionSpec()
    typeof = getattr(jax, "typeof", None) or jax.core.get_aval
    mesh = getattr(getattr(typeof(stacked), "sharding", None), "mesh", None)
    for out in (replicated, jax.sharding.NamedSharding(mesh, replicated)):
      try:  # a PartitionSpec, or the NamedSharding that jax 0.6 needs
        return lax.dot_general(
          stacked, stacked, numbers, precision=lax.Precision.HIGHEST, out_sharding=out
        )
      except NotImplementedError:
        continue
    raise err


def upper_pairs(k: int) -> list[tuple[int, int]]:
  """The pairs ``(i, j)``, ``i <= j < k``, of a symmetric K x K matrix."""
  return [(i, j) for i in range(k) for j in range(i, k)]


def gram(trees: Sequence[PyTree], skip_slow: jax.Array | bool = False) -> Dots:
  """The Gram matrix ``<trees[i], trees[j]>`` of K trees, exact at any scale.

  :func:`safe_dots` over the K (K + 1) / 2 pairs (one product of the stacked
  leaves per leaf in the stacked form); ``values`` is the K x K matrix with
  ``<X_i, X_j> = values[i, j] * 2**(e_i + e_j)``.
  """
  return _inner(trees, None, skip_slow)
