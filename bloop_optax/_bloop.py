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
  """State of :func:`bloop`.

  Attributes:
    steps: int32 number of ``update`` calls (indexes ``aux_weight`` schedules).
    skipped_steps: int32 number of steps whose main or aux gradient was not
      finite; those steps never entered ``main_ema``.
    main_ema: the EMA ``E`` of the main gradient, shaped like the params, in
      the accumulator dtype.
    cos_main_aux: float32 cosine between the last step's main and aux
      gradients (0 when either is zero), or ``None`` unless the transform was
      built with ``track_cosine=True``.
    proj_coef: float32 projection coefficient ``r = <P, A> / <P, P>`` of the
      last step.
  """

  steps: jax.Array
  skipped_steps: jax.Array
  main_ema: PyTree
  cos_main_aux: jax.Array | None
  proj_coef: jax.Array


def bloop(
  aux_weight: _checks.ScalarOrSchedule = 0.1,
  ema_decay: jax.typing.ArrayLike = 0.99,
  *,
  ema_order: str = "update_first",
  track_cosine: bool = False,
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
  EMA").

  Non-finite and huge gradients: a step whose ``M`` or ``A`` holds a NaN or an
  Inf never enters the EMA; the state keeps ``E``, counts the step in
  ``skipped_steps``, and the (non-finite) direction passes through so that a
  downstream ``optax.apply_if_finite`` skips it. Finite gradients whose
  float32 sums of squares overflow (norms above about 1e19) give the exact
  direction: the sums are then recomputed on gradients rescaled by a power of
  two, in a branch that costs nothing on ordinary steps. A projection vector
  with norm below about 1e-19 has ``<P, P>`` underflow to 0 and counts as
  zero.

  Cost: the step reads ``M`` and ``A`` once for ``<M, A>`` (whose finiteness
  is the guard above), writes the EMA in place, reads ``E'`` and ``A`` once
  for the two inner products of the projection, and leaves the direction as
  an elementwise expression that XLA fuses into the next transform. The
  cosine needs ``<M, M>`` and ``<A, A>``, one more read of both gradients,
  which is why it is opt-in.

  Args:
    aux_weight: ``λ >= 0``, a number, an array or a schedule of the step count.
    ema_decay: ``β`` in [0, 1], the weight on the OLD average as in
      ``optax.ema``. The paper's rate is ``ρ = 1 - β``; its default ``ρ = 0.01``
      is ``β = 0.99``.
    ema_order: ``"update_first"`` or ``"project_first"``, see above.
    track_cosine: also keep the cosine between ``M`` and ``A`` in the state
      (``cos_main_aux``); otherwise that field is ``None``.
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
    _checks.check_params(params, api)
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
