r"""What every aggregator shares: its state, the Gram matrix it decides from,
the argument checks, and the transform built around a weight rule.

For K objectives with gradients ``g_1 .. g_K`` an aggregator returns
:math:`d = \sum_i w_i g_i` with weights decided from the K x K Gram matrix
:math:`G_{ij} = \langle g_i, g_j\rangle` alone (:func:`bloop_optax._tree_math.gram`:
global inner products, scalars across devices), and :math:`d` is one
elementwise pass: the K x P Jacobian is never formed.

Optionally (``ema_decay``) the weights are decided from the Gram matrix of EMAs
of the K gradients and applied to the current gradients, as Bloop projects on
an EMA of the main gradient (Hsieh et al., ICML 2024, arXiv:2402.02998).

Every weight rule but Nash-MTL's and FairGrad's is invariant to a global scale
of :math:`G`, so the rules run on ``G / max_i G_ii``, rebuilt exactly from
rescaled inner products when the float32 sums overflow; those two are told the
power of 4 the Gram matrix was divided by and rescale their weights by it.
"""

from collections.abc import Callable
import numbers
from typing import Any
from typing import NamedTuple
from typing import Protocol

import jax
import jax.numpy as jnp
import optax

from bloop_optax import _checks
from bloop_optax import _pair
from bloop_optax import _tree_math as tm

PyTree = Any


class AggregatorState(NamedTuple):
  r"""State of the aggregators of :mod:`bloop_optax.aggregators`.

  Attributes:
    steps: int32 number of ``update`` calls.
    skipped_steps: int32 number of steps with a NaN or Inf in some gradient;
      those steps never entered ``grad_emas`` and gave NaN weights.
    grad_emas: the K EMAs of the gradients (accumulator dtype), or ``None``
      for ``ema_decay=None``.
    gram_cosines: float32 ``[K, K]`` cosines of the Gram matrix the weights
      were decided from at the last step (the gradients', or with
      ``ema_decay`` their EMAs'); 0 where a vector is zero. :func:`constant`
      and :func:`random`, whose weights ignore it, never compute it: the
      identity.
    objective_weights: float32 ``[K]``, the last step's weights :math:`w`
      (:math:`d = \sum_i w_i g_i`).
    rng_key: the PRNG key of a random aggregator (:func:`pcgrad`,
      :func:`gradvac`, :func:`random`), else ``None``.
    rule_state: the rule's own state across steps: :func:`gradvac`'s ``[K, K]``
      cosine targets, :func:`moco`'s weights; ``None`` for the other rules.
  """

  steps: jax.Array
  skipped_steps: jax.Array
  grad_emas: tuple[PyTree, ...] | None
  gram_cosines: jax.Array
  objective_weights: jax.Array
  rng_key: jax.Array | None
  rule_state: PyTree = None


def _check_count(num_objectives: Any, api: str) -> int:
  return _checks.check_int(
    num_objectives,
    "num_objectives",
    api,
    "an int >= 1 (the length of the tuple of gradients that update takes)",
    lambda v: v >= 1,
  )


def _check_key(key: Any, api: str) -> None:
  is_seed = isinstance(key, numbers.Integral) and not isinstance(key, bool)
  dtype = getattr(key, "dtype", None)
  is_key = dtype is not None and (
    jnp.issubdtype(dtype, jax.dtypes.prng_key) or jnp.issubdtype(dtype, jnp.integer)
  )
  if not (is_seed or is_key):
    got = "None" if key is None else f"{type(key).__name__} {key!r}"[:80]
    raise TypeError(f"{api}: expected key to be a PRNG key or an int seed; got {got}.")


def _check_ema(ema_decay: Any, api: str) -> None:
  if ema_decay is not None:
    _checks.check_ema_decay(ema_decay, api)


def _gram(trees, skip_slow: jax.Array | bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The Gram matrix of ``trees`` scaled by the common factor ``4**-m``
  (exact), whether they were finite, and ``m``: the true Gram matrix is the
  first times ``4**m``, which the rules whose weights depend on the scale
  (Nash-MTL, FairGrad) are told."""
  dots = tm.gram(trees, skip_slow)
  top = jnp.max(dots.exps)
  shift = dots.exps[:, None] + dots.exps[None, :] - 2 * top
  return jnp.ldexp(dots.values, shift), dots.finite, top


class Rule(Protocol):
  """A weight rule as the transform calls it, once per step.

  Args:
    gram: ``[K, K]`` Gram matrix divided by ``4**log2_scale`` (exact).
    log2_scale: int32 scalar; the true Gram matrix is ``gram * 4**log2_scale``
      (only the rules whose weights depend on the scale read it).
    key: a fresh PRNG subkey for a random rule, else ``None``.
    rule_state: the rule's own state from the last step (GradVac's cosine
      targets, MoCo's weights), ``None`` for a rule without one.

  Returns:
    ``(weights, rule_state)``: the ``[K]`` weights of the gradients and the
    rule's state for the next step.
  """

  def __call__(
    self, gram: jax.Array, log2_scale: jax.Array, key: jax.Array | None, rule_state: PyTree
  ) -> tuple[jax.Array, PyTree]: ...


def _aggregator(
  api: str,
  num_objectives: int,
  rule: Rule,
  ema_decay: jax.typing.ArrayLike | None,
  accumulator_dtype: Any,
  key: jax.Array | int | None = None,
  rule_state: PyTree = None,
  apply_to_emas: bool = False,
  reads_gram: bool = True,
) -> optax.GradientTransformationExtraArgs:
  # ``apply_to_emas``: the weights combine the EMAs, not the current gradients
  # (MoCo's direction from its tracked gradients). ``reads_gram=False``: weights
  # that ignore the gradients (the rule gets a zero matrix in the gradients'
  # dtype); the only read of the gradients before the weighted sum is their
  # finiteness.
  k = _check_count(num_objectives, api)
  _check_ema(ema_decay, api)
  acc = None if accumulator_dtype is None else jnp.dtype(accumulator_dtype)
  random = key is not None
  if random and (
    isinstance(key, numbers.Integral)
    or (jnp.ndim(key) == 0 and jnp.issubdtype(jnp.result_type(key), jnp.integer))
  ):
    # A seed: a Python int, or a 0-d integer array (optax.inject_hyperparams
    # turns numeric arguments into arrays).
    key = jax.random.PRNGKey(key)

  def init_fn(params: PyTree) -> AggregatorState:
    params = _checks.check_params(params, api)
    emas = None
    if ema_decay is not None:
      emas = tuple(tm.zeros_accumulator(params, acc) for _ in range(k))
    return AggregatorState(
      steps=jnp.zeros([], jnp.int32),
      skipped_steps=jnp.zeros([], jnp.int32),
      grad_emas=emas,
      gram_cosines=jnp.eye(k, dtype=jnp.float32),
      objective_weights=jnp.full([k], 1 / k, jnp.float32),
      rng_key=jnp.asarray(key) if random else None,
      rule_state=rule_state,
    )

  def update_fn(updates, state: AggregatorState, params=None, **extra):
    del params, extra
    grads = _pair.split_objectives_checked(updates, k, api)
    if not reads_gram:
      dtype = tm.wide(*(x.dtype for g in grads for x in jax.tree.leaves(g)))
      gram, finite, log2_scale = jnp.zeros((k, k), dtype), tm.all_finite(grads), 0
      emas = None
    elif state.grad_emas is None:
      gram, finite, log2_scale = _gram(grads)
      emas = None
    else:
      _pair.check_same_layout(
        grads[0],
        state.grad_emas[0],
        api,
        "grads_0",
        "the params given to init",
        "Call init with the params whose gradients you pass to update.",
      )
      # Finiteness first (one read of every gradient), so that the EMAs can
      # be written in place; then the Gram matrix of the EMAs.
      finite = tm.all_finite(grads)
      beta = jnp.asarray(ema_decay, jnp.result_type(float))
      emas = tuple(
        tm.ema_update(e, g, beta, finite) for e, g in zip(state.grad_emas, grads, strict=True)
      )
      gram, _, log2_scale = _gram(emas, skip_slow=~finite)
    rng_key, sub = jax.random.split(state.rng_key) if random else (None, None)
    weights, rule_state = rule(gram, log2_scale, sub, state.rule_state)
    weights = jnp.where(finite, weights, jnp.nan)
    if rule_state is not None:  # a skipped step leaves the rule's state as it was
      rule_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old), rule_state, state.rule_state
      )
    # MoCo steps along its tracked gradients (the EMAs), every other rule along
    # the current ones.
    if apply_to_emas:  # in the gradients' dtype, as every aggregator's direction
      direction = tm.linear_combination(list(weights), emas)
      direction = jax.tree.map(lambda d, g: d.astype(g.dtype), direction, grads[0])
    else:
      direction = tm.linear_combination(list(weights), grads)
    new_state = AggregatorState(
      steps=optax.safe_increment(state.steps),
      skipped_steps=jnp.where(
        finite, state.skipped_steps, optax.safe_increment(state.skipped_steps)
      ),
      grad_emas=emas,
      gram_cosines=(
        state.gram_cosines
        if not reads_gram
        else tm.cosine(gram, jnp.diag(gram)[:, None], jnp.diag(gram)[None, :])
      ),
      objective_weights=weights.astype(jnp.float32),
      rng_key=rng_key,
      rule_state=rule_state,
    )
    return direction, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _no_key(rule: Callable[[jax.Array], jax.Array]) -> Rule:
  """An internal rule from a weight rule of the Gram matrix alone."""
  return lambda gram, log2_scale, key, rule_state: (rule(gram), rule_state)


def _keyed(rule: Callable[[jax.Array, jax.Array], jax.Array]) -> Rule:
  """An internal rule from a weight rule of the Gram matrix and a key."""
  return lambda gram, log2_scale, key, rule_state: (rule(gram, key), rule_state)
