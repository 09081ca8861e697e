"""Per-group surgery: a pair-consuming transformation for each group of params."""

from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import optax

from bloop_optax import _checks
from bloop_optax import _pair

PyTree = Any


class PartitionState(NamedTuple):
  """State of :func:`partition`: the inner state of each group's transform."""

  inner_states: dict[Hashable, Any]


def _is_placeholder(params: Any) -> bool:
  """Whether ``init`` is called by ``optax.tree.map_params`` (as ``optax.masked``
  checks for it)."""
  utils = getattr(getattr(optax, "tree_utils", None), "_state_utils", None)
  placeholder = getattr(utils, "_ParamsPlaceholder", None)
  return placeholder is not None and isinstance(params, placeholder)


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def partition(
  transforms: Mapping[Hashable, optax.GradientTransformation],
  param_labels: PyTree | Callable[[PyTree], PyTree],
) -> optax.GradientTransformationExtraArgs:
  """Applies one pair-consuming transformation per group of parameters.

  The pair analogue of ``optax.partition`` (which cannot take a pair: its masks
  are shaped like the params). Each group sees ``MainAux`` restricted to its
  own leaves, so its inner products, and Bloop's projection, run over that group
  alone; the directions are merged back into one tree. For example, project
  only over the shared trunk of a multi-task model and let each head take its
  own gradient::

    bloop_optax.partition(
        {"trunk": bloop_optax.bloop(0.1), "head": bloop_optax.mixed(0.1)},
        param_labels=lambda params: {k: "trunk" if k == "trunk" else "head"
                                     for k in params})

  The global projection (plain :func:`bloop`) stays the default.

  Args:
    transforms: label -> a transformation taking ``MainAux(main, aux)`` (e.g.
      ``bloop``, ``mixed``), which may be a chain.
    param_labels: a pytree of labels shaped like the params, or a function of
      the params that returns one.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` taking ``MainAux(M, A)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import bloop_optax
    >>> tx = bloop_optax.partition(
    ...     {"a": bloop_optax.bloop(1.0, ema_decay=0.0), "b": bloop_optax.mixed(1.0)},
    ...     {"x": "a", "y": "b"})
    >>> m = {"x": jnp.array([1.0, 0.0]), "y": jnp.array([1.0])}
    >>> a = {"x": jnp.array([1.0, 1.0]), "y": jnp.array([2.0])}
    >>> d, _ = tx.update(bloop_optax.MainAux(m, a), tx.init(m))
    >>> d["x"], d["y"]  # "x" projected off its own M only; "y" mixed
    (Array([1., 1.], dtype=float32), Array([3.], dtype=float32))
  """
  api = "partition"

  def labels_for(tree: PyTree) -> PyTree:
    labels = param_labels(tree) if callable(param_labels) else param_labels
    _pair.check_same_layout(
      tree,
      labels,
      api,
      "the params",
      "param_labels",
      "Give one label per parameter leaf, in a tree shaped like the params.",
      shapes=False,
    )
    unknown = set(jax.tree.leaves(labels)) - set(transforms)
    if unknown:
      raise ValueError(
        f"{api}: every label needs a transform; got labels {sorted(map(str, unknown))}"
        f" with transforms only for {sorted(map(str, transforms))}."
      )
    return labels

  def mask(tree: PyTree, labels: PyTree, label: Hashable) -> PyTree:
    return jax.tree.map(lambda x, lab: x if lab == label else optax.MaskedNode(), tree, labels)

  def init_fn(params):
    if _is_placeholder(params):  # optax.tree.map_params: every group holds the params
      return PartitionState(inner_states={k: tx.init(params) for k, tx in transforms.items()})
    params = _checks.check_params(params, api)
    labels = labels_for(params)
    return PartitionState(
      inner_states={k: tx.init(mask(params, labels, k)) for k, tx in transforms.items()}
    )

  def update_fn(updates, state, params=None, **extra):
    main, aux = _checks.check_pair(updates, api)
    params = None if params is None else _checks.model_params(params)
    labels = labels_for(main if params is None else params)
    label_leaves, treedef = jax.tree.flatten(labels)
    pieces, inner_states = {}, {}
    for k, tx in transforms.items():
      sub = _pair.MainAux(mask(main, labels, k), mask(aux, labels, k))
      sub_params = None if params is None else mask(params, labels, k)
      d, inner_states[k] = tx.update(sub, state.inner_states[k], sub_params, **extra)
      pieces[k] = jax.tree.leaves(d, is_leaf=_is_masked)
    merged = [pieces[label][i] for i, label in enumerate(label_leaves)]
    return treedef.unflatten(merged), PartitionState(inner_states=inner_states)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
