r"""The paper's baselines as optax gradient transformations: Mixed, Dynamic
Barrier and two-task PCGrad. None keeps an EMA; each returns one direction
:math:`D = c_{\mathrm{main}} M + c_{\mathrm{aux}} A` shaped like the main gradient.

References:
  Hsieh, Thornton, Ndiaye, Klein, Cuturi, Ablin. "Careful with that Scalpel:
  Improving Gradient Surgery with an EMA". ICML 2024. arXiv:2402.02998.
"""

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from bloop_optax import _checks
from bloop_optax import _tree_math as tm

PyTree = Any


class SurgeryState(NamedTuple):
  r"""State of :func:`dynamic_barrier` and :func:`pcgrad_pair` (no EMA).

  Attributes:
    steps: int32 number of ``update`` calls (indexes ``aux_weight`` schedules).
    cos_main_aux: float32 cosine between the last step's main and aux
      gradients.
    proj_coef: float32 :math:`\langle M, A\rangle / \langle M, M\rangle` of the last step.
  """

  steps: jax.Array
  cos_main_aux: jax.Array
  proj_coef: jax.Array


class MixedState(NamedTuple):
  """State of :func:`mixed`: only the step count that indexes schedules."""

  steps: jax.Array


def mixed(aux_weight: _checks.ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
  r"""Mixed (regularised) training: :math:`D = M + \lambda A`.

  The paper's reference point: it minimises :math:`L_{\mathrm{main}} + \lambda L_{\mathrm{aux}}`
  and trades main-loss progress for aux progress.

  Args:
    aux_weight: :math:`\lambda \ge 0`, a number, an array or a schedule of the step count.

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
  _checks.check_aux_weight(aux_weight, api)

  def init_fn(params: PyTree) -> MixedState:
    params = _checks.check_params(params, api)
    del params
    return MixedState(steps=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra):
    del extra
    main, aux = _checks.check_pair(updates, api)
    if params is not None:
      _checks.check_against_params(main, params, api)
    lam = _checks.weight_at(aux_weight, state.steps)
    out = tm.linear_combination([jnp.ones_like(lam), lam], [main, aux])
    return out, MixedState(steps=optax.safe_increment(state.steps))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _no_ema_surgery(
  api: str,
  aux_weight: _checks.ScalarOrSchedule,
  coefficients: Callable[..., tuple[jax.Array, jax.Array]],
) -> optax.GradientTransformationExtraArgs:
  """A baseline ``D = c_main M + c_aux A`` whose coefficients come from
  ``coefficients(λ, <M, A> < 0, <M, A> / <M, M>, <M, A> / <A, A>)``.

  The inner products go through ``safe_dots``: exact ratios at any gradient
  norm, NaN passed through for non-finite gradients."""
  _checks.check_aux_weight(aux_weight, api)

  def init_fn(params: PyTree) -> SurgeryState:
    params = _checks.check_params(params, api)
    del params
    zero = jnp.zeros([], jnp.float32)
    return SurgeryState(steps=jnp.zeros([], jnp.int32), cos_main_aux=zero, proj_coef=zero)

  def update_fn(updates, state, params=None, **extra):
    del extra
    main, aux = _checks.check_pair(updates, api)
    if params is not None:
      _checks.check_against_params(main, params, api)
    lam = _checks.weight_at(aux_weight, state.steps)
    dots = tm.safe_dots([main, aux], [(0, 1), (0, 0), (1, 1)])
    ma, mm, aa = dots.values
    e_main, e_aux = dots.exps
    # Scale-free: <M, A> / <M, M> and <M, A> / <A, A> at any gradient norm.
    r_main = tm.scaled_ratio(ma, mm, e_aux - e_main)
    r_aux = tm.scaled_ratio(ma, aa, e_main - e_aux)
    c_main, c_aux = coefficients(lam, ma < 0, r_main, r_aux)
    out = tm.linear_combination([c_main, c_aux], [main, aux])
    new_state = SurgeryState(
      steps=optax.safe_increment(state.steps),
      cos_main_aux=tm.cosine(ma, mm, aa),
      proj_coef=r_main.astype(jnp.float32),
    )
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dynamic_barrier(
  aux_weight: _checks.ScalarOrSchedule,
) -> optax.GradientTransformationExtraArgs:
  r"""Dynamic Barrier, the paper's variant: :math:`D = \max(1 - \lambda r, 0) M + \lambda A`.

  With :math:`r = \langle M, A\rangle / \langle M, M\rangle` (0 when :math:`M = 0`). Equivalently
  the no-EMA projection :math:`M + \lambda (A - \min(r, 1/\lambda) M)`: it equals
  :math:`M + \lambda \pi(A; M)` while :math:`\lambda r \le 1` and drops :math:`M` entirely when the
  aux gradient is strongly aligned with it.

  Args:
    aux_weight: :math:`\lambda \ge 0`, a number, an array or a schedule of the step count.

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

  def coefficients(lam, conflict, r_main, r_aux):
    del conflict, r_aux
    return jnp.maximum(1 - lam * r_main, 0), lam

  return _no_ema_surgery("dynamic_barrier", aux_weight, coefficients)


def pcgrad_pair(aux_weight: _checks.ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
  r"""Two-task PCGrad with a weight on the aux task.

  With :math:`c = \langle M, A\rangle`: if :math:`c \ge 0`, :math:`D = M + \lambda A`; otherwise
  each gradient is projected off the other, :math:`D = \pi(M; A) + \lambda \pi(A; M)`, where
  :math:`\pi(a; p) = a - (\langle a, p\rangle / \langle p, p\rangle) p`.

  Args:
    aux_weight: :math:`\lambda \ge 0`, a number, an array or a schedule of the step count.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` taking ``MainAux(M, A)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import bloop_optax
    >>> tx = bloop_optax.pcgrad_pair(aux_weight=1.0)
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

  def coefficients(lam, conflict, r_main, r_aux):
    c_main = 1 - lam * jnp.where(conflict, r_main, 0)
    c_aux = lam - jnp.where(conflict, r_aux, 0)
    return c_main, c_aux

  return _no_ema_surgery("pcgrad_pair", aux_weight, coefficients)
