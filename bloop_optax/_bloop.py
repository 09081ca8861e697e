"""Bloop: the main gradient plus the part of the aux gradient orthogonal to an
EMA of the main gradient.

References:
  Hsieh, Thornton, Ndiaye, Klein, Cuturi, Ablin. "Careful with that Scalpel:
  Improving Gradient Surgery with an EMA". ICML 2024. arXiv:2402.02998.
"""

from typing import Any
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import optax

from bloop_optax import _checks
from bloop_optax import _tree_math as tm

PyTree = Any

EMA_ORDERS = ("update_first", "project_first")


class BloopState(NamedTuple):
  r"""State of :func:`bloop`.

  Attributes:
    steps: int32 number of ``update`` calls (indexes ``aux_weight`` schedules).
    skipped_steps: int32 number of steps whose main or aux gradient was not
      finite; those steps never entered ``main_ema``.
    main_ema: the EMA :math:`E` of the main gradient, shaped like the params, in
      the accumulator dtype.
    cos_main_aux: float32 cosine between the last step's main and aux
      gradients (0 when either is zero), or ``None`` unless the transform was
      built with ``track_cosine=True``.
    proj_coef: float32 projection coefficient :math:`r = \langle P, A\rangle / \langle P, P\rangle`
      of the last step.
  """

  steps: jax.Array
  skipped_steps: jax.Array
  main_ema: PyTree
  cos_main_aux: jax.Array | None
  proj_coef: jax.Array


def bloop(
  aux_weight: _checks.ScalarOrSchedule = 0.1,
  *,
  ema_decay: jax.typing.ArrayLike = 0.99,
  ema_order: str = "update_first",
  track_cosine: bool = False,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Bloop: the main gradient plus the aux gradient orthogonal to an EMA.

  With :math:`M`, :math:`A` the main and aux gradients, :math:`E` the EMA of :math:`M` kept in
  the state, :math:`\lambda` = ``aux_weight`` and :math:`\beta` = ``ema_decay``:

  .. math::

    D = M + \lambda (A - r P), \quad r = \frac{\langle P, A\rangle}{\langle P, P
    \rangle} \ (0 \text{ when } P = 0),

  where the inner products are global over the pytree and

  - ``ema_order="update_first"`` (the authors' code): :math:`E' = \beta E + (1-\beta) M`,
    then :math:`P = E'`;
  - ``ema_order="project_first"`` (the paper's Algorithm 1): :math:`P = E` (:math:`M`
    at the first step), then :math:`E' = \beta P + (1-\beta) M`.

  The added part :math:`\lambda (A - r P)` is orthogonal to :math:`P`, so to first order the
  main loss decreases as with :math:`M` alone, whatever :math:`\lambda`. :math:`\beta = 0` with
  ``update_first`` projects on the current main gradient ("Bloop without
  EMA").

  Non-finite and huge gradients: a step whose :math:`M` or :math:`A` holds a NaN or an
  Inf never enters the EMA; the state keeps :math:`E`, counts the step in
  ``skipped_steps``, and the (non-finite) direction passes through so that a
  downstream ``optax.apply_if_finite`` skips it. Finite gradients whose
  float32 sums of squares overflow (norms above about 1e19) give the exact
  direction: the sums are then recomputed on gradients rescaled by a power of
  two, in a branch that costs nothing on ordinary steps. A projection vector
  with norm below about 1e-19 has :math:`\langle P, P\rangle` underflow to 0 and counts as
  zero.

  Cost: the step reads :math:`M` and :math:`A` once for :math:`\langle M, A\rangle` (whose
  finiteness is the guard above), writes the EMA in place, reads :math:`E'` and :math:`A` once
  for the two inner products of the projection, and leaves the direction as
  an elementwise expression that XLA fuses into the next transform. The
  cosine needs :math:`\langle M, M\rangle` and :math:`\langle A, A\rangle`, one more read of both
  gradients, which is why it is opt-in.

  Args:
    aux_weight: :math:`\lambda \ge 0`, a number, an array or a schedule of the step count.
    ema_decay: :math:`\beta` in [0, 1], the weight on the OLD average as in
      ``optax.ema``. The paper's rate is :math:`\rho = 1 - \beta`; its default :math:`\rho = 0.01`
      is :math:`\beta = 0.99`.
    ema_order: ``"update_first"`` or ``"project_first"``, see above.
    track_cosine: also keep the cosine between :math:`M` and :math:`A` in the state
      (``cos_main_aux``); otherwise that field is ``None``.
    accumulator_dtype: dtype of the EMA. ``None`` keeps float32, or the
      params' dtype where it is wider.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``MainAux(main_grads, aux_grads)`` (or a 2-tuple, or a mapping with keys
    0 and 1 or "main" and "aux") and returns the direction :math:`D` shaped like
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
  _checks.check_aux_weight(aux_weight, api)
  _checks.check_ema_decay(ema_decay, api)
  if ema_order not in EMA_ORDERS:
    raise ValueError(
      f"{api}: expected ema_order in {EMA_ORDERS}; got {ema_order!r}."
      " 'update_first' is the authors' code, 'project_first' the paper's"
      " Algorithm 1."
    )
  acc = None if accumulator_dtype is None else jnp.dtype(accumulator_dtype)
  update_first = ema_order == "update_first"

  def init_fn(params: PyTree) -> BloopState:
    params = _checks.check_params(params, api)
    return BloopState(
      steps=jnp.zeros([], jnp.int32),
      skipped_steps=jnp.zeros([], jnp.int32),
      main_ema=tm.zeros_accumulator(params, acc),
      cos_main_aux=jnp.zeros([], jnp.float32) if track_cosine else None,
      proj_coef=jnp.zeros([], jnp.float32),
    )

  def update_fn(
    updates: Any, state: BloopState, params: PyTree | None = None, **extra
  ) -> tuple[PyTree, BloopState]:
    del params, extra
    main, aux = _checks.check_pair(updates, api)
    ema = state.main_ema
    _checks.check_against_params(main, ema, api)
    lam = _checks.weight_at(aux_weight, state.steps)
    beta = jnp.asarray(ema_decay, jnp.result_type(float))

    # Pass 1 reads M and A. <M, A> is not finite iff M or A holds a NaN or an
    # Inf (x * Inf is +-Inf or NaN, and a sum with such a term stays so), or
    # the sum overflowed, which safe_dots tells apart.
    pairs = [(0, 1), (0, 0), (1, 1)] if track_cosine else [(0, 1)]
    first = tm.safe_dots([main, aux], pairs)
    finite = first.finite
    if update_first:
      # E' written over E (in place), then the projection on P = E'. On a
      # skipped step P is the old E and D is not finite anyway.
      new_ema = tm.ema_update(ema, main, beta, finite)
      r = tm.projection_coef(tm.safe_dots([new_ema, aux], [(0, 1), (0, 0)], skip_slow=~finite))
      direction = tm.linear_combination([jnp.ones_like(lam), lam, -lam * r], [main, aux, new_ema])
    else:
      # P = E, or M while no average exists; E' = β P + (1 - β) M is written
      # last, after the direction has read the old E.
      has_ema = state.steps > state.skipped_steps

      on_ema = tm.safe_dots([ema, aux], [(0, 1), (0, 0)], skip_slow=~finite)
      # Only while no average exists (E is still zero) are M's products needed.
      proj = lax.cond(
        has_ema,
        lambda: on_ema,
        lambda: tm.safe_dots([main, aux], [(0, 1), (0, 0)], skip_slow=~finite),
      )
      r = tm.projection_coef(proj)
      lam_r = lam * r
      zero = jnp.zeros_like(lam_r)
      direction = tm.linear_combination(
        [1 - jnp.where(has_ema, zero, lam_r), lam, -jnp.where(has_ema, lam_r, zero)],
        [main, aux, ema],
      )
      # With P = M (no average yet), E' = β M + (1 - β) M = M.
      new_ema = tm.ema_update(ema, main, jnp.where(has_ema, beta, jnp.zeros_like(beta)), finite)

    new_state = BloopState(
      steps=optax.safe_increment(state.steps),
      skipped_steps=jnp.where(
        finite, state.skipped_steps, optax.safe_increment(state.skipped_steps)
      ),
      main_ema=new_ema,
      cos_main_aux=tm.cosine(*first.values) if track_cosine else None,
      proj_coef=r.astype(jnp.float32),
    )
    return direction, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
