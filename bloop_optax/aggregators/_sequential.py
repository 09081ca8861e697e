"""Rules that visit the gradients in random orders: PCGrad (project away
conflicts) and GradVac (reach a cosine target)."""

from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import optax

from bloop_optax import _checks
from bloop_optax import _tree_math as tm
from bloop_optax.aggregators._base import _aggregator
from bloop_optax.aggregators._base import _check_count
from bloop_optax.aggregators._base import _check_key
from bloop_optax.aggregators._base import _keyed
from bloop_optax.aggregators._linalg import _normalized
from bloop_optax.aggregators._linalg import _orders


def pcgrad_weights(gram: jax.Array, orders: jax.Array) -> jax.Array:
  r"""PCGrad for K objectives, with the given visiting orders.

  For each :math:`i`, start from :math:`g_i` and visit
  :math:`j = orders[i, 0], \ldots, orders[i, K-1]` (skipping ``i``): whenever the current vector
  ``v`` has :math:`\langle v, g_j\rangle < 0`, replace it by
  :math:`v - \langle v, g_j\rangle / \langle g_j, g_j\rangle g_j`. Then :math:`d = \sum_i v_i` (a
  sum, as in the paper's Algorithm 1). In weights, each :math:`v_i = sum_j a_ij g_j` and
  :math:`\langle v_i, g_j\rangle = (G a_i)_j`. Scale: invariant.

  Args:
    gram: ``[K, K]``.
    orders: ``[K, K]`` int, row :math:`i` a permutation of ``0 .. K-1``.
  """
  g = _normalized(gram)
  k = g.shape[0]

  def one(i, order):
    def visit(p, a):
      j = order[p]
      inner = g[j] @ a
      conflict = (j != i) & (inner < 0)
      step = jnp.where(conflict, -tm.ratio(inner, g[j, j]), 0)
      return a + jnp.where(jnp.arange(k) == j, step, 0)  # one-hot, not a scatter

    # A loop in the program (not unrolled): a compile time that does not grow with K.
    return lax.fori_loop(0, k, visit, (jnp.arange(k) == i).astype(g.dtype))

  return jnp.sum(jax.vmap(one)(jnp.arange(k), orders), axis=0)


def gradvac_weights(
  gram: jax.Array,
  targets: jax.Array,
  orders: jax.Array,
  *,
  target_decay: jax.typing.ArrayLike = 0.5,
) -> tuple[jax.Array, jax.Array]:
  r"""GradVac with the given cosine targets and visiting orders.

  For each :math:`i`, :math:`v_i` starts at :math:`g_i` and visits the other
  objectives :math:`j` in the order ``orders[i]`` (skipping ``i``). With
  :math:`\phi = \cos(v_i, g_j)` and the target :math:`\hat\phi_{ij}` (``targets[i, j]``), if
  :math:`\phi < \hat\phi_{ij}` it adds

  .. math::

    \frac{\|v_i\| \big(\hat\phi_{ij} \sqrt{1 - \phi^2} - \phi \sqrt{1 - \hat\phi_{ij}^2}\big)}
      {\|g_j\| \sqrt{1 - \hat\phi_{ij}^2}} \, g_j,

  which raises the cosine to :math:`\hat\phi_{ij}`; then the target moves toward the
  observed cosine, :math:`\hat\phi_{ij} \leftarrow \gamma \hat\phi_{ij} + (1 - \gamma) \phi`
  with :math:`\gamma` = ``target_decay``. :math:`d = \sum_i v_i` (a sum, as PCGrad).
  Cosines with a zero vector count as 0 and a division by zero as no correction
  (no :math:`\epsilon`). Scale: invariant.

  Args:
    gram: ``[K, K]``.
    targets: ``[K, K]`` cosine targets :math:`\hat\phi` (the diagonal is unused).
    orders: ``[K, K]`` int, row :math:`i` a permutation of ``0 .. K-1``.
    target_decay: the weight on the old target.

  Returns:
    ``(weights, new_targets)``.
  """
  g = _normalized(gram)
  k = g.shape[0]
  decay = jnp.asarray(target_decay, g.dtype)
  norms = jnp.sqrt(jnp.maximum(jnp.diag(g), 0))

  def one(i, order, row):
    def visit(p, carry):
      a, row = carry
      j = order[p]
      onehot = jnp.arange(k) == j
      other = j != i
      inner = g[j] @ a
      norm_v = jnp.sqrt(jnp.maximum(a @ g @ a, 0))
      phi = tm.ratio(inner, norm_v * norms[j])
      target = jnp.sum(jnp.where(onehot, row, 0))
      root_phi = jnp.sqrt(jnp.maximum(1 - phi * phi, 0))
      root_target = jnp.sqrt(jnp.maximum(1 - target * target, 0))
      den = norms[j] * root_target
      coef = norm_v * (target * root_phi - phi * root_target)
      add = other & (phi < target) & (den > 0)
      step = jnp.where(add, coef / jnp.where(den > 0, den, 1), 0)
      a = a + jnp.where(onehot, step, 0)  # one-hot, not a scatter
      return a, jnp.where(onehot & other, decay * target + (1 - decay) * phi, row)

    return lax.fori_loop(0, k, visit, ((jnp.arange(k) == i).astype(g.dtype), row))

  rows, new_targets = jax.vmap(one)(jnp.arange(k), orders, targets.astype(g.dtype))
  return jnp.sum(rows, axis=0), new_targets


def pcgrad(
  num_objectives: int,
  *,
  key: jax.Array | int = 0,
  ema_decay: jax.typing.ArrayLike | None = None,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""PCGrad for K objectives: project away pairwise conflicts, then sum.

  For each :math:`i`, :math:`v_i` starts at :math:`g_i` and, for the other objectives
  :math:`j` in a random order, loses its component along :math:`g_j` whenever
  :math:`\langle v_i, g_j\rangle < 0`; :math:`d = \sum_i v_i` (see :func:`pcgrad_weights`). Each
  step draws K fresh orders from the key kept in the state. With K = 2 the
  order does not matter and :math:`d` equals ``bloop_optax.pcgrad(1.0)``.

  Args:
    num_objectives: the number :math:`K` of objectives.
    key: a PRNG key, or an int seed, for the visiting orders.
    ema_decay: ``None`` (default) or :math:`\beta`: decide the projections from the
      EMAs' Gram matrix, as in :func:`mgda`.
    accumulator_dtype: dtype of the EMAs.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; see :func:`mgda`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.pcgrad(2, key=0)
    >>> g1, g2 = jnp.array([1.0, 0.0]), jnp.array([-1.0, 1.0])
    >>> d, _ = tx.update((g1, g2), tx.init(g1))
    >>> d  # (g1 off g2) + (g2 off g1)
    Array([0.5, 1.5], dtype=float32)

  References:
    Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task
    Learning", NeurIPS 2020, Algorithm 1.
  """
  api = "aggregators.pcgrad"
  k = _check_count(num_objectives, api)
  _check_key(key, api)

  def rule(gram, step_key):
    return pcgrad_weights(gram, _orders(step_key, k))

  return _aggregator(api, k, _keyed(rule), ema_decay, accumulator_dtype, key=key)


def gradvac(
  num_objectives: int,
  *,
  target_decay: jax.typing.ArrayLike = 0.5,
  key: jax.Array | int = 0,
  ema_decay: jax.typing.ArrayLike | None = None,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""GradVac: raise each pair's cosine to a target kept across steps.

  For each :math:`i`, :math:`v_i` starts at :math:`g_i` and, for the other objectives
  in a random order, gains a multiple of :math:`g_j` whenever
  :math:`\cos(v_i, g_j)` is below its target :math:`\hat\phi_{ij}`, which lifts it to
  the target; the targets are EMAs of the observed cosines, kept in the state
  (``rule_state``, starting at 0); :math:`d = \sum_i v_i` (see
  :func:`gradvac_weights`). With targets 0 this is PCGrad's projection. This is
  the variant TorchJD and LibMTL implement, on whole gradients (not per layer).

  Args:
    num_objectives: the number :math:`K` of objectives.
    target_decay: the weight on the old target (the paper's :math:`\beta` is
      ``1 - target_decay``; 0.5 as TorchJD's default).
    key: a PRNG key, or an int seed, for the visiting orders.
    ema_decay: ``None`` (default) or :math:`\beta`: decide from the EMAs' Gram matrix,
      as in :func:`mgda`.
    accumulator_dtype: dtype of the EMAs.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; see :func:`mgda`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.gradvac(2)
    >>> g1, g2 = jnp.array([1.0, 0.0]), jnp.array([-1.0, 1.0])
    >>> d, state = tx.update((g1, g2), tx.init(g1))
    >>> d  # targets 0 at the first step: PCGrad's (g1 off g2) + (g2 off g1)
    Array([0.5, 1.5], dtype=float32)
    >>> state.rule_state  # the targets moved halfway to the cosine -0.707
    Array([[ 0.        , -0.35355338],
           [-0.35355338,  0.        ]], dtype=float32)

  References:
    Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and Improving
    Multi-task Optimization in Massively Multilingual Models", ICLR 2021.
  """
  api = "aggregators.gradvac"
  k = _check_count(num_objectives, api)
  _check_key(key, api)
  _checks.check_number(target_decay, "target_decay", api, "in [0, 1]", lambda v: 0 <= v <= 1)

  def rule(gram, log2_scale, step_key, targets):
    weights, new = gradvac_weights(gram, targets, _orders(step_key, k), target_decay=target_decay)
    return weights, new.astype(targets.dtype)  # float32 targets, a stable state type

  targets = jnp.zeros([k, k], jnp.float32)
  return _aggregator(api, k, rule, ema_decay, accumulator_dtype, key=key, rule_state=targets)
