"""Bloop and the paper's baselines as optax gradient transformations.

Every transform takes ``updates=MainAux(main_grads, aux_grads)`` and returns one
direction ``D`` shaped like ``main_grads``, so it goes first in an
``optax.chain``. The inner products are global: one sum over every leaf of the
pytree, accumulated in at least float32.

References:
  Hsieh, Thornton, Ndiaye, Klein, Cuturi, Ablin. "Careful with that Scalpel:
  Improving Gradient Surgery with an EMA". ICML 2024. arXiv:2402.02998.
"""

from collections.abc import Callable
import math
import numbers
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from bloop_optax import _pair

PyTree = Any
ScalarOrSchedule = jax.typing.ArrayLike | Callable[[jax.Array], jax.Array]

EMA_ORDERS = ("update_first", "project_first")


class BloopState(NamedTuple):
  """State of :func:`bloop`.

  Attributes:
    steps: int32 number of ``update`` calls (indexes ``aux_weight`` schedules).
    skipped_steps: int32 number of steps whose main or aux gradient was not
      finite; those steps never entered ``main_ema``.
    main_ema: the EMA ``E`` of the main gradient, shaped like the params, in
      the accumulator dtype.
    cos_main_aux: float32 cosine between the last step's main and aux
      gradients (0 when either is zero).
    proj_coef: float32 projection coefficient ``r = <P, A> / <P, P>`` of the
      last step.
  """

  steps: jax.Array
  skipped_steps: jax.Array
  main_ema: PyTree
  cos_main_aux: jax.Array
  proj_coef: jax.Array


class SurgeryState(NamedTuple):
  """State of :func:`dynamic_barrier` and :func:`pcgrad` (no EMA).

  Attributes:
    steps: int32 number of ``update`` calls (indexes ``aux_weight`` schedules).
    cos_main_aux: float32 cosine between the last step's main and aux
      gradients.
    proj_coef: float32 ``<M, A> / <M, M>`` of the last step.
  """

  steps: jax.Array
  cos_main_aux: jax.Array
  proj_coef: jax.Array


class MixedState(NamedTuple):
  """State of :func:`mixed`: only the step count that indexes schedules."""

  steps: jax.Array


# ---------------------------------------------------------------- validation


def _check_aux_weight(aux_weight: ScalarOrSchedule, api: str) -> None:
  if callable(aux_weight):
    return
  if isinstance(aux_weight, numbers.Real) and not (math.isfinite(aux_weight) and aux_weight >= 0):
    raise ValueError(
      f"{api}: expected aux_weight to be a finite number >= 0 (or an array,"
      f" or a schedule); got {aux_weight!r}."
    )


def _check_ema_decay(ema_decay: jax.typing.ArrayLike, api: str) -> None:
  if callable(ema_decay):
    raise TypeError(
      f"{api}: expected ema_decay to be a number or an array in [0, 1]; got"
      " a callable. To schedule it, wrap the factory in"
      " optax.inject_hyperparams."
    )
  if isinstance(ema_decay, numbers.Real) and not 0 <= ema_decay <= 1:
    raise ValueError(
      f"{api}: expected ema_decay in [0, 1], the weight on the OLD average"
      " as in optax.ema (the paper's EMA rate is rho = 1 - ema_decay, so its"
      f" default rho = 0.01 is ema_decay = 0.99); got {ema_decay!r}."
    )


def _weight_at(aux_weight: ScalarOrSchedule, steps: jax.Array) -> jax.Array:
  return aux_weight(steps) if callable(aux_weight) else aux_weight


def check_pair(updates: Any, api: str) -> tuple[PyTree, PyTree]:
  main, aux = _pair.split_pair(updates, api)
  _pair.check_same_layout(
    main,
    aux,
    api,
    "main_grads",
    "aux_grads",
    "Differentiate both losses with respect to the same params, e.g. with"
    " bloop_optax.value_and_grads.",
  )
  return main, aux


def check_against_params(main: PyTree, params: PyTree, api: str) -> None:
  _pair.check_same_layout(
    main,
    params,
    api,
    "main_grads",
    "the params given to init",
    "Call init with the params whose gradients you pass to update.",
  )


# ---------------------------------------------------------------- tree maths


def _wide(*dtypes: Any) -> jnp.dtype:
  """The widest of ``dtypes`` and float32 (explicit, so strict promotion holds)."""
  return max((jnp.dtype(d) for d in (jnp.float32, *dtypes)), key=lambda d: d.itemsize)


def acc_dtype(dtype: Any, accumulator_dtype: Any) -> jnp.dtype:
  if accumulator_dtype is not None:
    return jnp.dtype(accumulator_dtype)
  return _wide(dtype)


def zeros_accumulator(params: PyTree, accumulator_dtype: Any = None) -> PyTree:
  """Zeros shaped (and sharded) like ``params``, in the accumulator dtype."""
  return jax.tree.map(
    lambda p: jnp.zeros_like(p, dtype=acc_dtype(p.dtype, accumulator_dtype)), params
  )


def _leaf_dot(x: jax.Array, y: jax.Array) -> jax.Array:
  dtype = _wide(x.dtype, y.dtype)
  return jnp.sum(x.astype(dtype) * y.astype(dtype))


def _global(x: PyTree, y: PyTree) -> jax.Array:
  dots = jax.tree.leaves(jax.tree.map(_leaf_dot, x, y))
  dtype = _wide(*(d.dtype for d in dots))
  return sum((d.astype(dtype) for d in dots), jnp.zeros((), dtype))


def tree_dots(*pairs: tuple[PyTree, PyTree]) -> jax.Array:
  """Global inner products ``[<x, y> for (x, y) in pairs]`` as one vector.

  Each is one sum over every leaf of a multiply-and-reduce, accumulated in at
  least float32 (XLA fuses the casts and products into the reductions, and
  sibling reductions over the same operands where the backend can). Leaves are
  never concatenated, so a sharded tree reduces locally and only scalars cross
  devices.
  """
  values = [_global(x, y) for x, y in pairs]
  dtype = _wide(*(v.dtype for v in values))
  return jnp.stack([v.astype(dtype) for v in values])


def tree_dot(x: PyTree, y: PyTree) -> jax.Array:
  """The global inner product ``<x, y>`` of two pytrees (real leaves).

  One sum over every leaf, accumulated in at least float32.

  Examples:
    >>> import jax.numpy as jnp
    >>> import bloop_optax
    >>> bloop_optax.tree_dot({"a": jnp.ones(2), "b": jnp.ones(())},
    ...                      {"a": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)})
    Array(6., dtype=float32)
  """
  return tree_dots((x, y))[0]


def _ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den`` for a squared norm ``den``, taken as 0 where ``den <= 0``.

  SPEC's zero-norm rule. A squared norm is never negative; ``<= 0`` also
  covers a Gram-Schmidt residual norm that rounding pushed just below 0.
  """
  positive = den > 0
  return jnp.where(positive, num / jnp.where(positive, den, 1), 0)


def _cosine(ma: jax.Array, mm: jax.Array, aa: jax.Array) -> jax.Array:
  return _ratio(ma, jnp.sqrt(mm) * jnp.sqrt(aa)).astype(jnp.float32)


def _combine(main: PyTree, aux: PyTree, c_main: jax.Array, c_aux: jax.Array):
  """``c_main * M + c_aux * A`` leaf by leaf, in the dtype of ``M``."""

  def leaf(m, a):
    dtype = _wide(m.dtype)
    out = c_main.astype(dtype) * m.astype(dtype) + c_aux.astype(dtype) * a.astype(dtype)
    return out.astype(m.dtype)

  return jax.tree.map(leaf, main, aux)


def _scalar(x: Any) -> jax.Array:
  return jnp.asarray(x, jnp.result_type(float))


# ---------------------------------------------------------------- bloop


def bloop(
  aux_weight: ScalarOrSchedule = 0.1,
  ema_decay: jax.typing.ArrayLike = 0.99,
  *,
  ema_order: str = "update_first",
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Bloop: the main gradient plus the aux gradient orthogonal to an EMA.

  With ``M``, ``A`` the main and aux gradients, ``E`` the EMA of ``M`` kept in
  the state, ``λ = aux_weight`` and ``β = ema_decay``:

  .. math::

    D = M + λ (A - r P), \quad r = \frac{\langle P, A\rangle}{\langle P, P
    \rangle} \ (0 \text{ when } P = 0),

  where the inner products are global over the pytree and

  - ``ema_order="update_first"`` (the authors' code): ``E' = β E + (1-β) M``,
    then ``P = E'``;
  - ``ema_order="project_first"`` (the paper's Algorithm 1): ``P = E`` (``M``
    at the first step), then ``E' = β P + (1-β) M``.

  The added part ``λ (A - r P)`` is orthogonal to ``P``, so to first order the
  main loss decreases as with ``M`` alone, whatever ``λ``. ``β = 0`` with
  ``update_first`` projects on the current main gradient ("Bloop without
  EMA"). The inner products are float32 sums (or wider): a projection vector
  with norm below about 1e-19 has ``<P, P>`` underflow to 0 and counts as zero.
  A step whose ``M`` or ``A`` is not finite (or whose float32 sums of
  squares overflow) never enters the EMA: the state keeps ``E``, counts the
  step in ``skipped_steps``, and the direction passes through so that a
  downstream ``optax.apply_if_finite`` can skip it.

  Args:
    aux_weight: ``λ >= 0``, a number, an array or a schedule of the step count.
    ema_decay: ``β`` in [0, 1], the weight on the OLD average as in
      ``optax.ema``. The paper's rate is ``ρ = 1 - β``; its default ``ρ = 0.01``
      is ``β = 0.99``.
    ema_order: ``"update_first"`` or ``"project_first"``, see above. With
      ``update_first`` the compiled step updates the EMA in place with no
      parameter-sized temporary; ``project_first`` needs the previous EMA after
      the new one is written, and XLA keeps one parameter-sized copy for it.
    accumulator_dtype: dtype of the EMA. ``None`` keeps float32, or the
      params' dtype where it is wider.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``MainAux(main_grads, aux_grads)`` (or a 2-tuple, or a mapping with keys
    0 and 1 or "main" and "aux") and returns the direction ``D`` shaped like
    ``main_grads``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import bloop_optax
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> tx = optax.chain(bloop_optax.bloop(aux_weight=1.0, ema_decay=0.0),
    ...                  optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> grads = bloop_optax.MainAux(main={"w": jnp.array([1.0, 0.0])},
    ...                             aux={"w": jnp.array([3.0, 4.0])})
    >>> updates, state = tx.update(grads, state, params)
    >>> updates["w"]  # -(M + λ (A - (<M, A> / <M, M>) M))
    Array([-1., -4.], dtype=float32)

  References:
    Hsieh et al., "Careful with that Scalpel: Improving Gradient Surgery with
    an EMA", ICML 2024 (arXiv:2402.02998), Eq. 5 and Algorithm 1.
  """
  api = "bloop"
  _check_aux_weight(aux_weight, api)
  _check_ema_decay(ema_decay, api)
  if ema_order not in EMA_ORDERS:
    raise ValueError(
      f"{api}: expected ema_order in {EMA_ORDERS}; got {ema_order!r}."
      " 'update_first' is the authors' code, 'project_first' the paper's"
      " Algorithm 1."
    )
  acc = None if accumulator_dtype is None else jnp.dtype(accumulator_dtype)
  update_first = ema_order == "update_first"

  def init_fn(params: PyTree) -> BloopState:
    return BloopState(
      steps=jnp.zeros([], jnp.int32),
      skipped_steps=jnp.zeros([], jnp.int32),
      main_ema=zeros_accumulator(params, acc),
      cos_main_aux=jnp.zeros([], jnp.float32),
      proj_coef=jnp.zeros([], jnp.float32),
    )

  def update_fn(
    updates: Any, state: BloopState, params: PyTree | None = None, **extra
  ) -> tuple[PyTree, BloopState]:
    del params, extra
    main, aux = check_pair(updates, api)
    check_against_params(main, state.main_ema, api)
    lam = _scalar(_weight_at(aux_weight, state.steps))
    beta = _scalar(ema_decay)

    def average(e, m):
      b = beta.astype(e.dtype)
      return b * e + (1 - b) * m.astype(e.dtype)

    ema = state.main_ema
    ma, mm, aa = tree_dots((main, aux), (main, main), (aux, aux))
    # A NaN or Inf in M or A makes <M, M> or <A, A> non-finite (so does an
    # overflow of these float32 sums): such a step never enters the EMA.
    finite = jnp.isfinite(mm) & jnp.isfinite(aa)
    keep_if_finite = lambda new, old: jnp.where(finite, new, old)
    if update_first:
      # E' first, written over E; then the projection on E'. Nothing reads the
      # old E afterwards, so XLA updates the EMA in place with no copy. (On a
      # skipped step P is the old E; D is non-finite then anyway.)
      new_ema = jax.tree.map(lambda e, m: keep_if_finite(average(e, m), e), ema, main)
      proj = new_ema
      pa, pp = tree_dots((proj, aux), (proj, proj))
    else:  # P = E, or M before the first average exists.
      has_ema = state.steps > state.skipped_steps
      ea, ee = tree_dots((ema, aux), (ema, ema))
      pa, pp = jnp.where(has_ema, ea, ma), jnp.where(has_ema, ee, mm)
      proj = jax.tree.map(lambda e, m: jnp.where(has_ema, e, m.astype(e.dtype)), ema, main)
      new_ema = jax.tree.map(lambda p, m, e: keep_if_finite(average(p, m), e), proj, main, ema)
    r = _ratio(pa, pp)

    def direction(m, a, p):
      dtype = _wide(p.dtype)
      lam_, r_ = lam.astype(dtype), r.astype(dtype)
      out = m.astype(dtype) + lam_ * (a.astype(dtype) - r_ * p.astype(dtype))
      return out.astype(m.dtype)

    updates_out = jax.tree.map(direction, main, aux, proj)
    new_state = BloopState(
      steps=optax.safe_increment(state.steps),
      skipped_steps=jnp.where(
        finite, state.skipped_steps, optax.safe_increment(state.skipped_steps)
      ),
      main_ema=new_ema,
      cos_main_aux=_cosine(ma, mm, aa),
      proj_coef=r.astype(jnp.float32),
    )
    return updates_out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------- baselines


def mixed(aux_weight: ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
  r"""Mixed (regularised) training: ``D = M + λ A``.

  The paper's reference point: it minimises ``L_main + λ L_aux`` and trades
  main-loss progress for aux progress.

  Args:
    aux_weight: ``λ >= 0``, a number, an array or a schedule of the step count.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` taking ``MainAux(M, A)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import bloop_optax
    >>> tx = bloop_optax.mixed(aux_weight=0.5)
    >>> state = tx.init(jnp.zeros(2))
    >>> d, state = tx.update(
    ...     bloop_optax.MainAux(jnp.array([1.0, 0.0]), jnp.array([2.0, 4.0])),
    ...     state)
    >>> d
    Array([2., 2.], dtype=float32)

  References:
    Hsieh et al., ICML 2024 (arXiv:2402.02998), Eq. 1 and Section 5.1.
  """
  api = "mixed"
  _check_aux_weight(aux_weight, api)

  def init_fn(params: PyTree) -> MixedState:
    del params
    return MixedState(steps=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra):
    del extra
    main, aux = check_pair(updates, api)
    if params is not None:
      check_against_params(main, params, api)
    lam = _scalar(_weight_at(aux_weight, state.steps))
    out = _combine(main, aux, jnp.ones_like(lam), lam)
    return out, MixedState(steps=optax.safe_increment(state.steps))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _no_ema_surgery(
  api: str,
  aux_weight: ScalarOrSchedule,
  coefficients: Callable[..., tuple[jax.Array, jax.Array]],
) -> optax.GradientTransformationExtraArgs:
  """A baseline ``D = c_main M + c_aux A`` whose coefficients use the dots."""
  _check_aux_weight(aux_weight, api)

  def init_fn(params: PyTree) -> SurgeryState:
    del params
    zero = jnp.zeros([], jnp.float32)
    return SurgeryState(steps=jnp.zeros([], jnp.int32), cos_main_aux=zero, proj_coef=zero)

  def update_fn(updates, state, params=None, **extra):
    del extra
    main, aux = check_pair(updates, api)
    if params is not None:
      check_against_params(main, params, api)
    lam = _scalar(_weight_at(aux_weight, state.steps))
    ma, mm, aa = tree_dots((main, aux), (main, main), (aux, aux))
    c_main, c_aux = coefficients(lam, ma, mm, aa)
    out = _combine(main, aux, c_main, c_aux)
    new_state = SurgeryState(
      steps=optax.safe_increment(state.steps),
      cos_main_aux=_cosine(ma, mm, aa),
      proj_coef=_ratio(ma, mm).astype(jnp.float32),
    )
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dynamic_barrier(
  aux_weight: ScalarOrSchedule,
) -> optax.GradientTransformationExtraArgs:
  r"""Dynamic Barrier, the paper's variant: ``D = max(1 - λ r, 0) M + λ A``.

  With ``r = <M, A> / <M, M>`` (0 when ``M = 0``). Equivalently the no-EMA
  projection ``M + λ (A - min(r, 1/λ) M)``: it equals ``M + λ π(A; M)`` while
  ``λ r <= 1`` and drops ``M`` entirely when the aux gradient is strongly
  aligned with it.

  Args:
    aux_weight: ``λ >= 0``, a number, an array or a schedule of the step count.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` taking ``MainAux(M, A)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import bloop_optax
    >>> tx = bloop_optax.dynamic_barrier(aux_weight=1.0)
    >>> state = tx.init(jnp.zeros(2))
    >>> d, state = tx.update(
    ...     bloop_optax.MainAux(jnp.array([1.0, 0.0]), jnp.array([3.0, 4.0])),
    ...     state)
    >>> d  # λ r = 3 > 1, so the M term is dropped
    Array([3., 4.], dtype=float32)

  References:
    Hsieh et al., ICML 2024 (arXiv:2402.02998), Section 5.1 and Table 1;
    Gong and Liu, "Bi-objective trade-off with dynamic barrier gradient
    descent", NeurIPS 2021.
  """

  def coefficients(lam, ma, mm, aa):
    del aa
    return jnp.maximum(1 - lam * _ratio(ma, mm), 0), lam

  return _no_ema_surgery("dynamic_barrier", aux_weight, coefficients)


def pcgrad(aux_weight: ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
  r"""Two-task PCGrad with a weight on the aux task.

  With ``c = <M, A>``: if ``c >= 0``, ``D = M + λ A``; otherwise each gradient
  is projected off the other, ``D = π(M; A) + λ π(A; M)``, where
  ``π(a; p) = a - (<a, p> / <p, p>) p``.

  Args:
    aux_weight: ``λ >= 0``, a number, an array or a schedule of the step count.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` taking ``MainAux(M, A)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import bloop_optax
    >>> tx = bloop_optax.pcgrad(aux_weight=1.0)
    >>> state = tx.init(jnp.zeros(2))
    >>> d, state = tx.update(
    ...     bloop_optax.MainAux(jnp.array([1.0, 0.0]), jnp.array([-1.0, 1.0])),
    ...     state)
    >>> d  # conflict: π(M; A) + π(A; M) = [0.5, 0.5] + [0, 1]
    Array([0.5, 1.5], dtype=float32)

  References:
    Hsieh et al., ICML 2024 (arXiv:2402.02998), Section 5.1;
    Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020.
  """

  def coefficients(lam, ma, mm, aa):
    conflict = ma < 0
    c_main = 1 - lam * jnp.where(conflict, _ratio(ma, mm), 0)
    c_aux = lam - jnp.where(conflict, _ratio(ma, aa), 0)
    return c_main, c_aux

  return _no_ema_surgery("pcgrad", aux_weight, coefficients)
