"""Hierarchical Bloop: several auxiliary losses in strict priority (paper, §2.3)."""

from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from bloop_optax import _checks
from bloop_optax import _pair
from bloop_optax import _tree_math as tm

PyTree = Any


class HierarchicalBloopState(NamedTuple):
  """State of :func:`hierarchical_bloop`.

  Attributes:
    steps: int32 number of ``update`` calls.
    skipped_steps: int32 number of steps with a non-finite gradient; those
      never entered the EMAs.
    level_emas: tuple of the EMAs of the main gradient and of every aux
      gradient but the last, each shaped like the params.
    cos_main_aux: float32 ``[K]``, cosine between the main gradient and each
      aux gradient at the last step.
  """

  steps: jax.Array
  skipped_steps: jax.Array
  level_emas: tuple[PyTree, ...]
  cos_main_aux: jax.Array


def hierarchical_bloop(
  aux_weights: Sequence[_checks.ScalarOrSchedule],
  *,
  ema_decay: jax.typing.ArrayLike = 0.99,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Bloop for objectives in strict priority, the main loss first.

  The priority is :math:`L_{\mathrm{main}} \succ L_1 \succ \ldots \succ L_K`.

  Keeps an EMA :math:`E_0` of the main gradient and :math:`E_k` of each aux gradient
  but the last (updated first, as ``bloop(ema_order="update_first")``),
  orthogonalises them in order (Gram–Schmidt: :math:`Q_0 = E_0`, :math:`Q_k = E_k`
  minus its components along :math:`Q_0, \ldots, Q_{k-1}`) and returns

  .. math::

    D = M + \sum_k \lambda_k \Big(A_k - \sum_{j<k} \frac{\langle A_k, Q_j\rangle}
    {\langle Q_j, Q_j\rangle} Q_j\Big),

  so each added part is orthogonal to every EMA above it in the hierarchy. A
  :math:`Q_j` that vanishes (:math:`\langle Q_j, Q_j\rangle` at most 16 float epsilons of
  :math:`\langle E_j, E_j\rangle`, i.e. :math:`E_j` in the span of the EMAs above) contributes
  nothing. With one aux loss it is :func:`bloop`. All inner products are global
  and come as scalars; the direction is one elementwise pass.

  Args:
    aux_weights: :math:`(\lambda_1, \ldots, \lambda_K)`, each >= 0: numbers, arrays or schedules.
    ema_decay: the weight on the OLD average, as in :func:`bloop`.
    accumulator_dtype: dtype of the EMAs (default float32, or wider params').

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
    tuple ``(main_grads, aux_grads_1, ..., aux_grads_K)`` (or a mapping with
    keys ``0..K``) and returns :math:`D` shaped like ``main_grads``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import bloop_optax
    >>> tx = bloop_optax.hierarchical_bloop(aux_weights=(1.0, 1.0), ema_decay=0.0)
    >>> m, a1, a2 = jnp.array([1.0, 0, 0]), jnp.array([1.0, 1, 0]), jnp.array([1.0, 1, 1])
    >>> d, _ = tx.update((m, a1, a2), tx.init(m))
    >>> d  # M + (A_1 off M) + (A_2 off M and A_1)
    Array([1., 1., 1.], dtype=float32)

  References:
    Hsieh et al., "Careful with that Scalpel: Improving Gradient Surgery with
    an EMA", ICML 2024 (arXiv:2402.02998), Section 2.3.
  """
  api = "hierarchical_bloop"
  if isinstance(aux_weights, (str, bytes)) or not isinstance(aux_weights, Sequence):
    raise TypeError(
      f"{api}: expected aux_weights to be a sequence (λ_1, ..., λ_K); got"
      f" {type(aux_weights).__name__}. For one aux loss, use bloop_optax.bloop."
    )
  if not aux_weights:
    raise ValueError(f"{api}: expected at least one aux weight; got an empty sequence.")
  for i, weight in enumerate(aux_weights):
    _checks.check_aux_weight(weight, api, f"aux_weights[{i}]")
  _checks.check_ema_decay(ema_decay, api)
  levels = len(aux_weights)  # K; EMAs are kept for levels 0 .. K-1
  acc = None if accumulator_dtype is None else jnp.dtype(accumulator_dtype)

  def init_fn(params):
    params = _checks.check_params(params, api)
    zeros = lambda: tm.zeros_accumulator(params, acc)
    return HierarchicalBloopState(
      steps=jnp.zeros([], jnp.int32),
      skipped_steps=jnp.zeros([], jnp.int32),
      level_emas=tuple(zeros() for _ in range(levels)),
      cos_main_aux=jnp.zeros([levels], jnp.float32),
    )

  def update_fn(updates, state, params=None, **extra):
    del params, extra
    grads = _pair.split_tuple(updates, levels + 1, api)
    main, auxes = grads[0], grads[1:]
    for k, aux in enumerate(auxes, start=1):
      _pair.check_same_layout(
        main,
        aux,
        api,
        "main_grads",
        f"aux_grads_{k}",
        "Differentiate every loss with respect to the same params.",
      )
    _checks.check_against_params(main, state.level_emas[0], api)
    lams = [_checks.weight_at(w, state.steps) for w in aux_weights]
    beta = jnp.asarray(ema_decay, jnp.result_type(float))

    # Finiteness (and the diagnostics) first, so the EMAs can be updated in
    # place: the squared norms of every gradient, and <M, A_k>.
    n = levels + 1
    first = tm.safe_dots(grads, [(k, k) for k in range(n)] + [(0, k) for k in range(1, n)])
    squares, main_aux = first.values[:n], first.values[n:]
    finite = first.finite

    emas = [
      tm.ema_update(e, g, beta, finite) for e, g in zip(state.level_emas, grads, strict=False)
    ]

    # Every inner product the surgery needs, in one call: the Gram matrix of
    # the EMAs (symmetric: pairs i <= j) and cross[k - 1, l] = <A_k, E_l> for
    # l < k. They are exact at any scale: each tree X is represented by
    # X / 2**e_X, and the 2**e factors are put back in the final weights.
    upper = [(i, j) for i in range(levels) for j in range(i, levels)]
    lower = [(levels + k - 1, j) for k in range(1, levels + 1) for j in range(k)]
    dots = tm.safe_dots([*emas, *auxes], upper + lower, skip_slow=~finite)
    products, crossed = dots.values[: len(upper)], dots.values[len(upper) :]
    ema_exps, aux_exps = dots.exps[:levels], dots.exps[levels:]
    gram = tm.matrix_from_pairs(products, upper, (levels, levels), symmetric=True)
    cross = tm.matrix_from_pairs(crossed, [(r - levels, c) for r, c in lower], (levels, levels))

    # Gram–Schmidt in coefficient space over the rescaled EMAs:
    # Q_j = sum_l basis[j, l] E_l / 2**e_l.
    tol = 16 * jnp.finfo(gram.dtype).eps
    basis, norms = [], []  # rows Q_j as Python lists: no scatter
    for j in range(levels):
      row = (jnp.arange(levels) == j).astype(gram.dtype)
      for i in range(j):  # remove from E_j its components along Q_i
        row = row - tm.ratio(basis[i] @ gram[j], norms[i]) * basis[i]
      norm = row @ gram @ row
      alive = norm > tol * gram[j, j]
      basis.append(jnp.where(alive, row, 0.0))
      norms.append(jnp.where(alive, norm, 0.0))

    # D = M + sum_k λ_k A_k + sum_l w_l E_l, where A_k's component along Q_j
    # is 2**(e_Ak) <A_k / 2**e_Ak, Q_j> / <Q_j, Q_j> Q_j.
    weights = jnp.zeros([levels], gram.dtype)
    for k in range(1, levels + 1):
      for j in range(k):
        coef = tm.ratio(basis[j] @ cross[k - 1], norms[j])
        shift = aux_exps[k - 1] - ema_exps
        weights = weights - jnp.ldexp(lams[k - 1].astype(gram.dtype) * coef * basis[j], shift)

    def direction(m, *rest):
      a_leaves, e_leaves = rest[:levels], rest[levels:]
      dtype = tm.wide(m.dtype, *(e.dtype for e in e_leaves))
      out = m.astype(dtype)
      for lam, a in zip(lams, a_leaves, strict=True):
        out = out + lam.astype(dtype) * a.astype(dtype)
      for w, e in zip(weights, e_leaves, strict=True):
        out = out + w.astype(dtype) * e.astype(dtype)
      return out.astype(m.dtype)

    updates_out = jax.tree.map(direction, main, *auxes, *emas)
    new_state = HierarchicalBloopState(
      steps=optax.safe_increment(state.steps),
      skipped_steps=jnp.where(
        finite, state.skipped_steps, optax.safe_increment(state.skipped_steps)
      ),
      level_emas=tuple(emas),
      cos_main_aux=tm.cosine(main_aux, squares[0], squares[1:]),
    )
    return updates_out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
