"""Robust aggregation: Krum."""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from bloop_optax import _checks
from bloop_optax.aggregators._base import _aggregator
from bloop_optax.aggregators._base import _check_count
from bloop_optax.aggregators._base import _no_key
from bloop_optax.aggregators._linalg import _normalized


def krum_weights(gram: jax.Array, *, n_byzantine: int = 0, n_selected: int = 1) -> jax.Array:
  r"""Krum: the mean of the gradients closest to their neighbours.

  Each gradient's score is the sum of its squared distances
  :math:`\|g_i - g_j\|^2 = G_{ii} + G_{jj} - 2 G_{ij}` to its
  :math:`K - f - 2` nearest other gradients (:math:`f` = ``n_byzantine``); the
  ``n_selected`` gradients with the lowest scores are averaged (Multi-Krum; ties
  go to the lower index). Needs :math:`K \ge f + 3`. Scale: invariant.
  """
  k = gram.shape[0]
  _check_krum(k, n_byzantine, n_selected, "aggregators.krum_weights")
  g = _normalized(gram)
  diag = jnp.diag(g)
  dist = jnp.maximum(diag[:, None] + diag[None, :] - 2 * g, 0)
  dist = jnp.where(jnp.eye(k, dtype=bool), jnp.inf, dist)
  nearest = jnp.sort(dist, axis=1)[:, : k - n_byzantine - 2]
  scores = jnp.sum(nearest, axis=1)
  # Each score's rank (ties to the lower index), by comparisons: no scatter,
  # which jax 0.6 cannot partition on an explicit mesh.
  index = jnp.arange(k)
  before = (scores[None, :] < scores[:, None]) | (
    (scores[None, :] == scores[:, None]) & (index[None, :] < index[:, None])
  )
  rank = jnp.sum(before, axis=1)
  return jnp.where(rank < n_selected, 1 / n_selected, 0).astype(g.dtype)


def _check_krum(k: int, n_byzantine: Any, n_selected: Any, api: str) -> None:
  _checks.check_int(n_byzantine, "n_byzantine", api, "an int >= 0", lambda v: v >= 0)
  _checks.check_int(
    n_selected, "n_selected", api, f"an int in [1, K] (K = {k})", lambda v: 1 <= v <= k
  )
  if k < n_byzantine + 3:
    raise ValueError(
      f"{api}: Krum needs K >= n_byzantine + 3 gradients (each score sums the distances to"
      f" K - n_byzantine - 2 >= 1 neighbours); got K = {k} and n_byzantine = {n_byzantine}."
    )


def krum(
  num_objectives: int,
  *,
  n_byzantine: int = 0,
  n_selected: int = 1,
  ema_decay: jax.typing.ArrayLike | None = None,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Krum: the mean of the gradients that sit closest to the others.

  A robust rule: with up to ``n_byzantine`` arbitrary (faulty) gradients among
  the :math:`K`, it keeps the ``n_selected`` gradients whose squared distances to
  their nearest neighbours sum lowest (see :func:`krum_weights`); distances come
  from the Gram matrix.

  Args:
    num_objectives: the number :math:`K \ge` ``n_byzantine + 3`` of objectives.
    n_byzantine: the number :math:`f` of gradients that may be arbitrary.
    n_selected: how many gradients to average (1: Krum, more: Multi-Krum).
    ema_decay: ``None`` (default) or :math:`\beta`: decide the weights from the EMAs'
      Gram matrix, as in :func:`mgda`.
    accumulator_dtype: dtype of the EMAs.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; see :func:`mgda`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.krum(4, n_byzantine=1, n_selected=2)
    >>> grads = tuple(jnp.array(v) for v in ([1.0, 0.0], [1.1, 0.0], [0.9, 0.1], [-9.0, 5.0]))
    >>> d, state = tx.update(grads, tx.init(grads[0]))
    >>> state.objective_weights  # the outlier is never chosen
    Array([0.5, 0.5, 0. , 0. ], dtype=float32)

  References:
    Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017.
  """
  api = "aggregators.krum"
  k = _check_count(num_objectives, api)
  _check_krum(k, n_byzantine, n_selected, api)
  rule = _no_key(lambda gram: krum_weights(gram, n_byzantine=n_byzantine, n_selected=n_selected))
  return _aggregator(api, k, rule, ema_decay, accumulator_dtype)
