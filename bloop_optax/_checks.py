"""Validation of the transforms' hyperparameters and of the pair they take."""

from collections.abc import Callable
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bloop_optax import _grads_equinox
from bloop_optax import _pair

PyTree = Any
ScalarOrSchedule = jax.typing.ArrayLike | Callable[[jax.Array], jax.Array]


def _is_number_like(value: Any) -> bool:
  """A real Python or NumPy number, or an array of a numeric dtype (what
  ``optax.inject_hyperparams`` passes, possibly traced)."""
  if isinstance(value, (bool, np.bool_)):
    return False
  if isinstance(value, numbers.Real):
    return True
  dtype = getattr(value, "dtype", None)
  if dtype is None:
    return False
  try:
    return bool(jnp.issubdtype(dtype, jnp.number))
  except TypeError:
    return False


def check_number(
  value: Any,
  name: str,
  api: str,
  expected: str,
  ok: Callable[[float], bool] | None = None,
  *,
  schedule: bool = False,
  optional: bool = False,
) -> None:
  """Raises TypeError unless ``value`` is a number (or a numeric array; a
  callable where ``schedule``; ``None`` where ``optional``), and ValueError
  when a Python number fails ``ok``.

  Arrays are taken as given: ``optax.inject_hyperparams`` passes them, possibly
  traced, so their values cannot be checked here.
  """
  if (optional and value is None) or (schedule and callable(value)):
    return
  if not _is_number_like(value):
    got = "None" if value is None else f"{type(value).__name__} {value!r}"[:80]
    also = (", or a schedule (a callable of the step count)" if schedule else "") + (
      ", or None" if optional else ""
    )
    hint = " Pass a number, not a string." if isinstance(value, str) else ""
    raise TypeError(f"{api}: expected {name} to be {expected}{also}; got {got}.{hint}")
  if isinstance(value, numbers.Real) and ok is not None and not ok(value):
    raise ValueError(f"{api}: expected {name} to be {expected}; got {value!r}.")


def check_int(value: Any, name: str, api: str, expected: str, ok: Callable[[int], bool]) -> int:
  """A Python int satisfying ``ok``: TypeError for any other type (bools and
  floats included), ValueError for an int that fails ``ok``."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    got = "None" if value is None else f"{type(value).__name__} {value!r}"[:80]
    hint = (
      f" Under optax.inject_hyperparams, name it in static_args=({name!r},)."
      if hasattr(value, "dtype")
      else ""
    )
    raise TypeError(f"{api}: expected {name} to be {expected} (a Python int); got {got}.{hint}")
  if not ok(int(value)):
    raise ValueError(f"{api}: expected {name} to be {expected}; got {value!r}.")
  return int(value)


def check_aux_weight(aux_weight: ScalarOrSchedule, api: str, name: str = "aux_weight") -> None:
  check_number(
    aux_weight,
    name,
    api,
    "a finite number >= 0 (or an array)",
    lambda v: math.isfinite(v) and v >= 0,
    schedule=True,
  )


def check_ema_decay(ema_decay: jax.typing.ArrayLike, api: str, name: str = "ema_decay") -> None:
  if callable(ema_decay):
    raise TypeError(
      f"{api}: expected {name} to be a number or an array in [0, 1]; got"
      " a callable. To schedule it, wrap the factory in"
      " optax.inject_hyperparams."
    )
  check_number(ema_decay, name, api, "a number in [0, 1] (or an array)")
  if isinstance(ema_decay, numbers.Real) and not 0 <= ema_decay <= 1:
    raise ValueError(
      f"{api}: expected {name} in [0, 1], the weight on the OLD average"
      " as in optax.ema (the paper's EMA rate is rho = 1 - ema_decay, so its"
      f" default rho = 0.01 is ema_decay = 0.99); got {ema_decay!r}."
    )


def weight_at(aux_weight: ScalarOrSchedule, steps: jax.Array) -> jax.Array:
  """The aux weight at ``steps`` (a schedule is called), as a float array."""
  value = aux_weight(steps) if callable(aux_weight) else aux_weight
  return jnp.asarray(value, jnp.result_type(float))


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
    model_params(params),
    api,
    "main_grads",
    "the params given to init",
    "Call init with the params whose gradients you pass to update. If an optimizer"
    " after the surgery keeps its own structure of the params (optax.lookahead's"
    " LookaheadParams are understood), place that optimizer around the chain instead.",
  )


def model_params(params: PyTree) -> PyTree:
  """The model's params inside an optimizer's own wrapper of them.

  ``optax.lookahead`` placed after the surgery makes a chain's ``init`` and
  ``update`` receive ``optax.LookaheadParams(fast, slow)``; the gradients are
  shaped like ``fast``, the params being trained.
  """
  lookahead = getattr(optax, "LookaheadParams", None)
  if lookahead is not None and isinstance(params, lookahead):
    return params.fast
  return params


def check_params(params: PyTree, api: str) -> PyTree:
  """The params whose gradients the transform takes (see :func:`model_params`);
  raises TypeError naming the first leaf that is not an array."""
  params = model_params(params)
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if isinstance(leaf, (jax.Array, np.ndarray, np.generic, numbers.Number)) or (
      hasattr(leaf, "shape") and hasattr(leaf, "dtype")
    ):
      continue
    raise TypeError(
      f"{api}: expected the params given to init to be a pytree of arrays; the"
      f" leaf at {jax.tree_util.keystr(path) or 'the root'} is a"
      f" {type(leaf).__name__}. For an Equinox module pass"
      " eqx.filter(model, eqx.is_inexact_array) (and use the same filter for the"
      " params given to update); for Flax NNX, nnx.state(model, nnx.Param), as"
      " nnx.Optimizer does."
    )
  return params


# ---------------------------------------------------------- value_and_grads


def holds(tree: Any, predicate: Callable[[Any], bool]) -> bool:
  """Whether some leaf of ``tree`` (``predicate`` marking leaves) satisfies it."""
  return any(predicate(leaf) for leaf in jax.tree.leaves(tree, is_leaf=predicate))


def check_differentiable(tree: Any, where: str) -> None:
  """Raises TypeError naming the first leaf ``jax.grad`` cannot differentiate."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if _grads_equinox.is_inexact_array(leaf) or isinstance(leaf, (float, complex)):
      continue
    at = f"{where} at {jax.tree_util.keystr(path) or 'the root'}"
    if isinstance(leaf, (jax.Array, np.ndarray, bool, int, np.generic)):
      kind = f"an integer or boolean leaf, {_pair._describe(jnp.asarray(leaf))}"
    else:
      kind = f"a non-array leaf, {type(leaf).__name__} {str(leaf)[:60]!r}"
    raise TypeError(
      f"value_and_grads: {at} is {kind}; only float (inexact) leaves can be"
      " differentiated. Fixes: pass that value in an argument that is not in"
      " argnums; or keep only the float leaves in the differentiated argument"
      " (e.g. eqx.partition(model, eqx.is_inexact_array), or a dict of the"
      " trainable arrays); Equinox modules and Flax NNX modules are filtered"
      " automatically."
    )
