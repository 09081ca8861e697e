"""Every gradient of a function of several losses from one forward pass."""

from collections.abc import Callable
from collections.abc import Sequence
import functools
from typing import Any

import jax
import jax.numpy as jnp

from bloop_optax._pair import MainAux


def _losses(out: Any, has_aux: bool) -> tuple[jax.Array, ...]:
  """The tuple of scalar losses ``fun`` returned (two or more), or raises."""
  if not (isinstance(out, (tuple, list)) and len(out) >= 2):
    expected = "((main_loss, aux_loss), aux_data)" if has_aux else "(main_loss, aux_loss)"
    raise TypeError(
      f"value_and_grads: expected fun to return {expected} with scalar"
      f" losses (or more aux losses after the main one); got"
      f" {type(out).__name__}: {jax.tree.structure(out)}."
      + ("" if has_aux else " If fun also returns data, pass has_aux=True.")
    )
  auxes = ["aux_loss"] if len(out) == 2 else [f"aux_loss_{k}" for k in range(1, len(out))]
  names = ["main_loss", *auxes]
  for name, loss in zip(names, out, strict=True):
    shape = jnp.shape(loss)
    if shape != ():
      raise TypeError(
        f"value_and_grads: expected {name} to be a scalar; got shape {shape}."
        " Reduce it (e.g. with .mean()) inside fun."
      )
  return tuple(out)


def value_and_grads(
  fun: Callable[..., Any],
  argnums: int | Sequence[int] = 0,
  has_aux: bool = False,
) -> Callable[..., tuple[Any, MainAux | tuple[Any, ...]]]:
  """Like ``jax.value_and_grad`` for a function of two (or more) losses.

  ``fun`` returns ``(main_loss, aux_loss)`` (or ``((main_loss, aux_loss),
  aux_data)`` with ``has_aux=True``). The returned function runs ``fun``
  forward ONCE (``jax.linearize``) and pulls back twice, once per loss
  (``jax.linear_transpose`` of that loss's output), so a model with mutable
  state (BatchNorm statistics, dropout keys) steps that state once per call,
  and each backward pass covers only its own loss's graph.

  Args:
    fun: the function to differentiate.
    argnums: which positional argument(s) to differentiate, as in
      ``jax.grad``.
    has_aux: whether ``fun`` returns ``(losses, aux_data)``.

  Returns:
    A function with the signature of ``fun`` returning ``(losses, grads)``:
    ``losses`` is ``MainAux(main_loss, aux_loss)`` (or ``(MainAux(...),
    aux_data)`` with ``has_aux``) and ``grads`` is ``MainAux(g_main, g_aux)``,
    each shaped like the differentiated argument(s), ready for
    :func:`bloop_optax.bloop`. If ``fun`` returns more losses, ``(main_loss,
    aux_loss_1, ..., aux_loss_K)``, both are plain tuples of that length, ready
    for :func:`bloop_optax.hierarchical_bloop`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import bloop_optax
    >>> def losses(w):
    ...   return jnp.sum((w - 1.0) ** 2), jnp.sum(w ** 2)
    >>> (main, aux), grads = bloop_optax.value_and_grads(losses)(jnp.zeros(2))
    >>> float(main), float(aux)
    (2.0, 0.0)
    >>> grads.main, grads.aux
    (Array([-2., -2.], dtype=float32), Array([0., 0.], dtype=float32))

  References:
    Hsieh et al., "Careful with that Scalpel: Improving Gradient Surgery with
    an EMA", ICML 2024 (arXiv:2402.02998).
  """
  single = isinstance(argnums, int)
  nums = (argnums,) if single else tuple(argnums)

  @functools.wraps(fun)
  def wrapped(*args, **kwargs):
    for n in nums:
      if not -len(args) <= n < len(args):
        raise TypeError(
          f"value_and_grads: argnums={argnums!r} needs positional argument"
          f" {n}; got {len(args)} positional argument(s)."
        )
    nums_pos = tuple(n % len(args) for n in nums)
    # The other arguments are closed over. Rebuilding their pytrees inside the
    # traced function gives pytree nodes that record the inner trace: Flax NNX
    # Variables (BatchNorm statistics, RNG counts) can then be updated there.
    leaves, treedef = jax.tree.flatten((args, kwargs))

    def restricted(*diff_args):
      full_args, full_kwargs = jax.tree.unflatten(treedef, leaves)
      full_args = list(full_args)
      for n, value in zip(nums_pos, diff_args, strict=True):
        full_args[n] = value
      out = fun(*full_args, **full_kwargs)
      if has_aux and not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(
          "value_and_grads: has_aux=True expects fun to return"
          f" ((main_loss, aux_loss), aux_data); got {type(out).__name__}:"
          f" {jax.tree.structure(out)}."
        )
      losses, data = out if has_aux else (out, None)
      return _losses(losses, has_aux), data

    diff = tuple(args[n] for n in nums_pos)
    losses, tangent_fn, data = jax.linearize(restricted, *diff, has_aux=True)
    # Transposing each output's projection of the linearization, instead of
    # pulling (1, 0) and (0, 1) back through the joint vjp, lets JAX treat the
    # other losses' cotangents as symbolic zeros: each backward pass covers
    # only its own loss's graph (a regulariser's gradient no longer costs a
    # second backward pass through the network).
    grads = []
    for k, loss in enumerate(losses):
      transpose = jax.linear_transpose(lambda *t, k=k: tangent_fn(*t)[k], *diff)
      g = transpose(jnp.ones_like(loss))
      grads.append(g[0] if single else g)
    if len(losses) == 2:
      losses, grads = MainAux(*losses), MainAux(*grads)
    else:
      grads = tuple(grads)
    value = (losses, data) if has_aux else losses
    return value, grads

  return wrapped
