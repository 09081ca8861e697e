"""The ``(main, aux)`` gradient pair and the checks that guard it."""

from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax

PyTree = Any


class MainAux(NamedTuple):
  """A pair of pytrees for the main and the auxiliary objective.

  Every transform of this package takes ``MainAux(main_grads, aux_grads)`` as
  its ``updates``; :func:`bloop_optax.value_and_grads` returns one.

  Attributes:
    main: the main objective's pytree (gradients, or a loss).
    aux: the auxiliary objective's pytree, shaped like ``main``.
  """

  main: PyTree
  aux: PyTree


def _describe(tree: PyTree) -> str:
  """A short phrase for a pytree's top level: its type, then keys, length or shape."""
  name = type(tree).__name__
  if hasattr(tree, "shape") and hasattr(tree, "dtype"):
    return f"an array {jax.numpy.dtype(tree.dtype).name}{list(tree.shape)}"
  if isinstance(tree, Mapping):
    keys = sorted(map(repr, tree.keys()))
    shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
    return f"a {name} with keys [{shown}]"
  if isinstance(tree, (tuple, list)):
    return f"a {name} of length {len(tree)}"
  return f"a {name}"


def split_pair(updates: Any, api: str) -> tuple[PyTree, PyTree]:
  """Returns ``(main, aux)`` from any accepted pair form, or raises TypeError.

  Accepted: :class:`MainAux`, any tuple or list of length 2, or a mapping whose
  keys are exactly ``{0, 1}`` or ``{"main", "aux"}`` (the ``nnx.State`` that
  ``nnx.Optimizer.update`` builds from a tuple or from a ``MainAux``).
  """
  if isinstance(updates, (tuple, list)) and len(updates) == 2:
    return updates[0], updates[1]
  if isinstance(updates, Mapping):
    keys = set(updates.keys())
    if keys == {0, 1}:
      return updates[0], updates[1]
    if keys == {"main", "aux"}:
      return updates["main"], updates["aux"]
  raise TypeError(
    f"{api}: expected updates=MainAux(main_grads, aux_grads) (or a 2-tuple,"
    " or a mapping with keys 0 and 1, or 'main' and 'aux', such as the"
    " nnx.State that Flax NNX builds from a pair); got"
    f" {_describe(updates)}. Pass both gradients, e.g. the MainAux returned"
    " by bloop_optax.value_and_grads, not a single gradient; a transform placed"
    " before this one in a chain must pass the pair through."
  )


def _n_trees(updates: Any, n: int) -> tuple[PyTree, ...] | None:
  """``n`` pytrees from a tuple or list of length ``n`` or a mapping keyed
  exactly ``0 .. n-1``, else None."""
  if isinstance(updates, (tuple, list)) and len(updates) == n:
    return tuple(updates)
  if isinstance(updates, Mapping) and set(updates.keys()) == set(range(n)):
    return tuple(updates[i] for i in range(n))
  return None


def split_tuple(updates: Any, n: int, api: str) -> tuple[PyTree, ...]:
  """Returns ``n`` pytrees from a tuple or list of length ``n``, or a mapping
  with keys exactly ``0 .. n-1`` (what Flax NNX builds from a tuple)."""
  trees = _n_trees(updates, n)
  if trees is not None:
    return trees
  raise TypeError(
    f"{api}: expected updates=(main_grads, aux_grads_1, ..., aux_grads_{n - 1}), a tuple"
    f" of {n} pytrees (one more than aux_weights), or a mapping with keys 0..{n - 1};"
    f" got {_describe(updates)}."
  )


def split_objectives(updates: Any, n: int, api: str) -> tuple[PyTree, ...]:
  """Returns the gradients of ``n`` objectives of equal standing from a tuple
  or list of length ``n`` or a mapping with keys exactly ``0 .. n-1`` (what
  Flax NNX builds from a tuple)."""
  trees = _n_trees(updates, n)
  if trees is not None:
    return trees
  raise TypeError(
    f"{api}: expected updates=(grads_0, ..., grads_{n - 1}), a tuple of {n} pytrees (one"
    f" per objective, num_objectives={n}), or a mapping with keys 0..{n - 1}; got"
    f" {_describe(updates)}."
    " bloop_optax.value_and_grads returns such a tuple for a function of K losses."
  )


def split_objectives_checked(updates: Any, n: int, api: str) -> tuple[PyTree, ...]:
  """:func:`split_objectives`, then a ValueError unless all share one layout."""
  grads = split_objectives(updates, n, api)
  for i, g in enumerate(grads[1:], start=1):
    check_same_layout(
      grads[0],
      g,
      api,
      "grads_0",
      f"grads_{i}",
      "Differentiate every loss with respect to the same params, e.g. with"
      " bloop_optax.value_and_grads.",
    )
  return grads


def _first_mismatch(left: PyTree, right: PyTree, shapes: bool = True) -> str | None:
  """Describes the first key path where two trees differ, or returns None."""
  left_leaves, left_def = jax.tree_util.tree_flatten_with_path(left)
  right_leaves, right_def = jax.tree_util.tree_flatten_with_path(right)
  left_paths = [path for path, _ in left_leaves]
  right_paths = [path for path, _ in right_leaves]
  if left_def != right_def:
    for a, b in zip(left_paths, right_paths, strict=False):
      if a != b:
        return f"key path {jax.tree_util.keystr(a)} vs {jax.tree_util.keystr(b)}"
    if len(left_paths) != len(right_paths):
      extra = (left_paths if len(left_paths) > len(right_paths) else right_paths)[
        min(len(left_paths), len(right_paths))
      ]
      return (
        f"{len(left_paths)} leaves vs {len(right_paths)} leaves (first unmatched key"
        f" path {jax.tree_util.keystr(extra)})"
      )
    return (
      f"the node types differ along the same key paths ({_describe(left)} vs {_describe(right)})"
    )
  if not shapes:
    return None
  for (path, a), (_, b) in zip(left_leaves, right_leaves, strict=True):
    a_shape, b_shape = jax.numpy.shape(a), jax.numpy.shape(b)
    if a_shape != b_shape:
      where = jax.tree_util.keystr(path)
      return f"at key path {where}: shape {a_shape} vs {b_shape}"
  return None


def check_same_layout(
  left: PyTree,
  right: PyTree,
  api: str,
  left_name: str,
  right_name: str,
  fix: str,
  shapes: bool = True,
) -> None:
  """Raises ValueError unless ``left`` and ``right`` have one structure and shapes."""
  mismatch = _first_mismatch(left, right, shapes)
  if mismatch is not None:
    raise ValueError(
      f"{api}: expected {left_name} and {right_name} with the same tree"
      f" structure{' and leaf shapes' if shapes else ''}; they differ: {mismatch}"
      f" ({left_name} first). {fix}"
    )
