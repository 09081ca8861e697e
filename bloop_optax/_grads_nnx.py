"""Flax NNX objects in :func:`bloop_optax.value_and_grads`, as ``nnx.value_and_grad``
treats them: split the objects into the differentiated state and the rest,
merge them back inside the trace, and write every state change of the forward
pass (BatchNorm statistics, ``Rngs`` counts) back into the objects passed in.
Flax is never imported here; the helpers look for the module the user imported.
"""

from collections.abc import Callable
import sys
from typing import Any

import jax

from bloop_optax import _checks

API = "value_and_grads"


def nnx():
  """flax.nnx if the user has imported it, else None."""
  return sys.modules.get("flax.nnx")


def is_object(x: Any) -> bool:
  """An NNX module, ``Rngs``, Variable or other NNX object."""
  module = nnx()
  if module is None:
    return False
  bases = tuple(getattr(module, n) for n in ("Pytree", "Object", "Variable") if hasattr(module, n))
  return isinstance(x, bases)


def is_graph_object(x: Any) -> bool:
  """An NNX module, Rngs or other graph object (not a bare Variable)."""
  return is_object(x) and not isinstance(x, nnx().Variable)


def tree_mode() -> bool:
  """Whether Flax NNX runs in tree mode (``nnx.set_graph_mode(False)``), where
  its modules are plain pytrees; flax versions without the switch are graph only."""
  module = nnx()
  switch = None if module is None else getattr(module, "set_graph_mode", None)
  return switch is not None and not switch.current_value()


def is_diff_state(x: Any) -> bool:
  module = nnx()
  return module is not None and isinstance(x, getattr(module, "DiffState", ()))


def variables(tree: Any) -> list[Any]:
  """The NNX Variables of a pytree, in flattening order."""
  variable = nnx().Variable
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, variable))
  return [x for x in leaves if isinstance(x, variable)]


def get(variable: Any) -> Any:
  return variable.get_value() if hasattr(variable, "get_value") else variable.value


def set(variable: Any, value: Any) -> None:  # noqa: A001 (module-level, read as _grads_nnx.set)
  if hasattr(variable, "set_value"):
    variable.set_value(value)
  else:
    variable.value = value


def error_hint(err: Exception) -> Exception | None:
  """A clearer error for an NNX object that ``fun`` closes over and mutates."""
  errors = sys.modules.get("flax.errors")
  if nnx() is None or errors is None or not isinstance(err, errors.TraceContextError):
    return None
  return type(err)(
    f"{err}\n{API}: a Flax NNX object that fun closes over (not one of its"
    " arguments) was mutated inside the forward pass, e.g. call-time nnx.Rngs"
    " used by Dropout. Pass it to the function as an argument instead, as"
    " nnx.value_and_grad needs too: value_and_grads(loss_fn)(model, batch,"
    " rngs). Its state change is then written back, once per call."
  )


class GraphCall:
  """One call of ``fun`` whose arguments hold NNX objects (graph mode), in the
  adapter shape of :class:`bloop_optax._grads_pytree.PytreeCall`.

  ``filters`` maps each differentiated argument to the filter of its state.
  """

  def __init__(self, args: tuple, kwargs: dict, nums: tuple[int, ...], filters: dict):
    module = nnx()
    filterlib = sys.modules["flax.nnx.filterlib"]
    keeps = {n: filterlib.to_predicate(f) for n, f in filters.items()}
    self.nums = nums
    self.arg_flat = [jax.tree.flatten(a, is_leaf=is_object) for a in args]
    self.kw_flat, self.kw_def = jax.tree.flatten(kwargs, is_leaf=is_object)
    # Every NNX object of every argument, split together (shared references
    # stay shared), those of the differentiated arguments first.
    order = list(nums) + [i for i in range(len(args)) if i not in nums]
    nodes, self.where = [], {}
    for i in order:
      for j, leaf in enumerate(self.arg_flat[i][0]):
        if is_object(leaf):
          self.where[(i, j)] = len(nodes)
          nodes.append(leaf)
    for j, leaf in enumerate(self.kw_flat):
      if is_object(leaf):
        self.where[("kw", j)] = len(nodes)
        nodes.append(leaf)
    self.nodes = tuple(nodes)
    node_arg = {k: i for (i, _), k in self.where.items()}  # node index -> its argument

    def is_diff(path, value):
      n = node_arg[path[0]]
      return n in keeps and keeps[n](path[1:], value)

    self.graphdef, diff_state, rest_state = module.split(self.nodes, is_diff, ...)
    plain = {}  # the non-NNX leaves of the differentiated arguments
    for n in nums:
      leaves = [x for j, x in enumerate(self.arg_flat[n][0]) if (n, j) not in self.where]
      _checks.check_differentiable(leaves, f"argument {n} (in argnums), its non-NNX leaf")
      plain[n] = leaves
    # Rebuilt inside the trace: Variables made there may be mutated there.
    self.rest_leaves, self.rest_def = jax.tree.flatten(rest_state)
    self.diff = (diff_state, plain)

  def _rebuild(self, new_nodes, plain_values):
    out_args = []
    for i, (leaves, tdef) in enumerate(self.arg_flat):
      it = iter(plain_values.get(i, ()))
      fresh = [
        new_nodes[self.where[(i, j)]]
        if (i, j) in self.where
        else (next(it) if i in plain_values else x)
        for j, x in enumerate(leaves)
      ]
      out_args.append(tdef.unflatten(fresh))
    fresh_kw = [
      new_nodes[self.where[("kw", j)]] if ("kw", j) in self.where else x
      for j, x in enumerate(self.kw_flat)
    ]
    return out_args, self.kw_def.unflatten(fresh_kw)

  def call(self, fun: Callable[..., Any], diff: tuple) -> tuple[Any, Any]:
    module = nnx()
    diff_state, plain_values = diff
    rest = jax.tree.unflatten(self.rest_def, self.rest_leaves)
    new_nodes = module.merge(self.graphdef, diff_state, rest)
    full_args, full_kwargs = self._rebuild(new_nodes, plain_values)
    losses, data = fun(*full_args, **full_kwargs)
    if _checks.holds(data, is_graph_object):
      raise TypeError(
        f"{API}: fun's aux_data holds a Flax NNX module or Rngs; return its state"
        " (nnx.state(obj)) or arrays instead. The objects passed as arguments"
        " are updated in place."
      )
    return losses, (data, module.state(new_nodes))

  def finish(self, data: Any) -> Any:
    data, new_state = data
    nnx().update(self.nodes, new_state)
    return data

  def grads(self, diff_grads: tuple) -> tuple:
    module = nnx()
    g_state, g_plain = diff_grads
    out = []
    for n in self.nums:
      leaves, tdef = self.arg_flat[n]
      it = iter(g_plain[n])
      fresh = []
      for j, _ in enumerate(leaves):
        if (n, j) in self.where:
          k = self.where[(n, j)]
          fresh.append(g_state[k] if k in g_state else module.State({}))
        else:
          fresh.append(next(it))
      out.append(tdef.unflatten(fresh))
    return tuple(out)
