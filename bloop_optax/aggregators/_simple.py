"""Weights that ignore the gradients' geometry: the mean, fixed weights, random weights."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bloop_optax import _checks
from bloop_optax import _pair
from bloop_optax import _tree_math as tm
from bloop_optax.aggregators._base import _aggregator
from bloop_optax.aggregators._base import _check_count
from bloop_optax.aggregators._base import _check_key
from bloop_optax.aggregators._base import _keyed
from bloop_optax.aggregators._base import _no_key


def mean_weights(gram: jax.Array) -> jax.Array:
  """:math:`w_i = 1 / K`: the average of the gradients."""
  k = gram.shape[0]
  return jnp.full([k], 1 / k, gram.dtype)


def constant_weights(gram: jax.Array, weights: jax.typing.ArrayLike) -> jax.Array:
  """The given weights, whatever the gradients: :math:`d = \\sum_i w_i g_i`."""
  return jnp.broadcast_to(jnp.asarray(weights, gram.dtype), gram.shape[:1])


def random_weights(gram: jax.Array, key: jax.Array) -> jax.Array:
  r"""Random loss weighting: :math:`w = \operatorname{softmax}(z)`, :math:`z \sim N(0, I_K)`.

  The weights ignore the gradients (the Gram matrix only sets :math:`K` and the
  dtype; :func:`random` passes zeros); a new draw every step from ``key``.
  """
  k = gram.shape[0]
  return jax.nn.softmax(jax.random.normal(key, [k], gram.dtype))


def mean(num_objectives: int) -> optax.GradientTransformationExtraArgs:
  r"""The average of the K gradients, :math:`d = \sum_i g_i / K`: the baseline.

  It reads no inner product, keeps no state and never skips a step.

  Args:
    num_objectives: the number :math:`K` of objectives: the length of the
      tuple of gradients ``update`` takes.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    :math:`(grads_0, \ldots, grads_{K-1})` and returns :math:`d` shaped like
    ``grads_0``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.mean(2)
    >>> d, _ = tx.update((jnp.array([1.0, 0.0]), jnp.array([0.0, 3.0])), tx.init(None))
    >>> d
    Array([0.5, 1.5], dtype=float32)
  """
  api = "aggregators.mean"
  k = _check_count(num_objectives, api)

  def init_fn(params):
    params = _checks.check_params(params, api)
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra):
    del params, extra
    grads = _pair.split_objectives_checked(updates, k, api)
    # 1 / K in the gradients' widest dtype (a float32 1/3 is off by 1e-8 for float64 gradients)
    dtype = tm.wide(*(x.dtype for g in grads for x in jax.tree.leaves(g)))
    weights = [jnp.asarray(1 / k, dtype)] * k
    return tm.linear_combination(weights, grads), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def constant(
  num_objectives: int, weights: jax.typing.ArrayLike
) -> optax.GradientTransformationExtraArgs:
  r"""Fixed weights: :math:`d = \sum_i w_i g_i` with the given :math:`w`.

  ``constant(K, jnp.ones(K))`` sums the gradients; :func:`mean` averages them.
  The Gram matrix is never computed (``gram_cosines`` stays the identity).

  Args:
    num_objectives: the number :math:`K` of objectives.
    weights: the :math:`K` weights, a 1-d array or sequence of numbers.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; see :func:`mgda`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.constant(2, [1.0, 0.5])
    >>> d, _ = tx.update((jnp.array([2.0, 0.0]), jnp.array([0.0, 4.0])), tx.init(None))
    >>> d
    Array([2., 2.], dtype=float32)
  """
  api = "aggregators.constant"
  values = np.asarray(weights)
  if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.bool_):
    raise TypeError(
      f"{api}: expected weights to be a 1-d sequence of K >= 1 numbers; got {weights!r}."
    )
  if values.ndim != 1 or values.size < 1:
    raise ValueError(
      f"{api}: expected weights to be a 1-d sequence of K >= 1 numbers; got {weights!r}."
    )
  if not np.all(np.isfinite(values)):
    raise ValueError(f"{api}: expected finite weights; got {weights!r}.")
  k = _check_count(num_objectives, api)
  if values.size != k:
    raise ValueError(
      f"{api}: expected {k} weights (num_objectives={k}); got {values.size}: {weights!r}."
    )
  rule = _no_key(lambda gram: constant_weights(gram, values))
  return _aggregator(api, k, rule, None, None, reads_gram=False)


def random(
  num_objectives: int, *, key: jax.Array | int = 0
) -> optax.GradientTransformationExtraArgs:
  r"""Random loss weighting: the gradients weighted by softmax of a normal draw.

  Every step draws :math:`z \sim N(0, I_K)` from the key in the state and returns
  :math:`d = \sum_i \operatorname{softmax}(z)_i g_i` (see :func:`random_weights`). The
  weights do not depend on the gradients, so there is no EMA option and the
  Gram matrix is never computed (``gram_cosines`` stays the identity).

  Args:
    num_objectives: the number :math:`K` of objectives.
    key: a PRNG key, or an int seed.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; see :func:`mgda`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from bloop_optax import aggregators
    >>> tx = aggregators.random(3, key=0)
    >>> g = jnp.ones(2)
    >>> d, state = tx.update((g, g, g), tx.init(g))
    >>> round(float(state.objective_weights.sum()), 6)  # weights on the simplex
    1.0

  References:
    Lin, Ye, Xu, Shi, Zhang, Kwok, "Reasonable Effectiveness of Random
    Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022.
  """
  api = "aggregators.random"
  _check_key(key, api)
  rule = _keyed(random_weights)
  return _aggregator(api, num_objectives, rule, None, None, key=key, reads_gram=False)
