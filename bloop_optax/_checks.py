"""Validation of the transforms' hyperparameters and of the pair they take."""

from collections.abc import Callable
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bloop_optax import _pair

PyTree = Any
ScalarOrSchedule = jax.typing.ArrayLike | Callable[[jax.Array], jax.Array]


def check_aux_weight(aux_weight: ScalarOrSchedule, api: str) -> None:
  if callable(aux_weight):
    return
  if isinstance(aux_weight, numbers.Real) and not (math.isfinite(aux_weight) and aux_weight >= 0):
    raise ValueError(
      f"{api}: expected aux_weight to be a finite number >= 0 (or an array,"
      f" or a schedule); got {aux_weight!r}."
    )


def check_ema_decay(ema_decay: jax.typing.ArrayLike, api: str) -> None:
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
    params,
    api,
    "main_grads",
    "the params given to init",
    "Call init with the params whose gradients you pass to update.",
  )


def check_params(params: PyTree, api: str) -> None:
  """Raises TypeError naming the first leaf of ``params`` that is not an array."""
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
