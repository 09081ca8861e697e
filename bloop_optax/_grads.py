"""Every gradient of a function of several losses from one forward pass.

Three kinds of differentiated argument are understood:

* plain pytrees of float arrays (``jax.grad``'s rules; integer, boolean and
  non-array leaves are refused with the leaf's path);
* Equinox modules (a differentiated argument holding an ``eqx.Module``): only
  the inexact-array leaves are differentiated, the others get ``None`` in the
  gradients, as ``eqx.filter_grad`` does;
* Flax NNX objects (modules, ``nnx.Rngs``, Variables): as ``nnx.grad``, the
  ``wrt`` state (``nnx.Param`` by default) is differentiated and returned as an
  ``nnx.State``, and every other state change of the forward pass (BatchNorm
  statistics, RNG counts) is written back into the objects passed in.
"""

from collections.abc import Callable
from collections.abc import Sequence
import functools
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bloop_optax._pair import MainAux
from bloop_optax._pair import _describe

_API = "value_and_grads"


def _losses(out: Any, has_aux: bool) -> tuple[jax.Array, ...]:
  """The tuple of scalar losses ``fun`` returned (two or more), or raises."""
  if not (isinstance(out, (tuple, list)) and len(out) >= 2):
    expected = "((main_loss, aux_loss), aux_data)" if has_aux else "(main_loss, aux_loss)"
    raise TypeError(
      f"{_API}: expected fun to return {expected} with scalar"
      f" losses (or more aux losses after the main one); got"
      f" {_describe(out)}." + ("" if has_aux else " If fun also returns data, pass has_aux=True.")
    )
  auxes = ["aux_loss"] if len(out) == 2 else [f"aux_loss_{k}" for k in range(1, len(out))]
  names = ["main_loss", *auxes]
  for name, loss in zip(names, out, strict=True):
    if not (hasattr(loss, "shape") or isinstance(loss, (int, float, complex))):
      hint = (
        " fun seems to return ((main_loss, aux_loss), aux_data): pass has_aux=True,"
        " as with jax.value_and_grad."
        if not has_aux and isinstance(out[0], (tuple, list))
        else " Return scalar arrays, e.g. jnp.mean(...), one per loss."
      )
      raise TypeError(f"{_API}: expected {name} to be a scalar; got {_describe(loss)}.{hint}")
    shape = jnp.shape(loss)
    if shape != ():
      raise TypeError(
        f"{_API}: expected {name} to be a scalar; got shape {shape}."
        " Reduce it (e.g. with .mean()) inside fun."
      )
  return tuple(out)


# ------------------------------------------------------------------ frameworks


def _nnx():
  """flax.nnx if the user has imported it (never imported here), else None."""
  return sys.modules.get("flax.nnx")


def _eqx_module_type():
  eqx = sys.modules.get("equinox")
  return None if eqx is None else eqx.Module


def _is_nnx_object(x: Any) -> bool:
  nnx = _nnx()
  if nnx is None:
    return False
  bases = tuple(getattr(nnx, n) for n in ("Pytree", "Object", "Variable") if hasattr(nnx, n))
  return isinstance(x, bases)


def _is_nnx_graph_object(x: Any) -> bool:
  """An NNX module, Rngs or other graph object (not a bare Variable)."""
  nnx = _nnx()
  return _is_nnx_object(x) and not isinstance(x, nnx.Variable)


def _nnx_tree_mode() -> bool:
  """Whether Flax NNX runs in tree mode (``nnx.set_graph_mode(False)``), where
  its modules are plain pytrees; flax versions without the switch are graph only."""
  nnx = _nnx()
  switch = None if nnx is None else getattr(nnx, "set_graph_mode", None)
  return switch is not None and not switch.current_value()


def _is_diff_state(x: Any) -> bool:
  nnx = _nnx()
  return nnx is not None and isinstance(x, getattr(nnx, "DiffState", ()))


def _variables(tree: Any) -> list[Any]:
  """The NNX Variables of a pytree, in flattening order."""
  variable = _nnx().Variable
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, variable))
  return [x for x in leaves if isinstance(x, variable)]


def _get(variable: Any) -> Any:
  return variable.get_value() if hasattr(variable, "get_value") else variable.value


def _set(variable: Any, value: Any) -> None:
  if hasattr(variable, "set_value"):
    variable.set_value(value)
  else:
    variable.value = value


def _holds(tree: Any, predicate: Callable[[Any], bool]) -> bool:
  return any(predicate(leaf) for leaf in jax.tree.leaves(tree, is_leaf=predicate))


def _is_inexact_array(x: Any) -> bool:
  """Equinox's rule: a JAX or NumPy array of a floating or complex dtype."""
  return isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.inexact)


def _check_differentiable(tree: Any, where: str) -> None:
  """Raises TypeError naming the first leaf ``jax.grad`` cannot differentiate."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if _is_inexact_array(leaf) or isinstance(leaf, (float, complex)):
      continue
    at = f"{where} at {jax.tree_util.keystr(path) or 'the root'}"
    if isinstance(leaf, (jax.Array, np.ndarray, bool, int, np.generic)):
      kind = f"an integer or boolean leaf, {_describe(jnp.asarray(leaf))}"
    else:
      kind = f"a non-array leaf, {type(leaf).__name__} {str(leaf)[:60]!r}"
    raise TypeError(
      f"{_API}: {at} is {kind}; only float (inexact) leaves can be"
      " differentiated. Fixes: pass that value in an argument that is not in"
      " argnums; or keep only the float leaves in the differentiated argument"
      " (e.g. eqx.partition(model, eqx.is_inexact_array), or a dict of the"
      " trainable arrays); Equinox modules and Flax NNX modules are filtered"
      " automatically."
    )


# ------------------------------------------------------------------ the core


def _one_forward(restricted: Callable[..., Any], diff: tuple[Any, ...]):
  """Runs ``restricted(*diff) -> (losses, data)`` once; a gradient per loss."""
  losses, tangent_fn, data = jax.linearize(restricted, *diff, has_aux=True)
  # Transposing each output's projection of the linearization, instead of
  # pulling (1, 0) and (0, 1) back through the joint vjp, lets JAX treat the
  # other losses' cotangents as symbolic zeros: each backward pass covers
  # only its own loss's graph (a regulariser's gradient no longer costs a
  # second backward pass through the network).
  grads = []
  for k, loss in enumerate(losses):
    transpose = jax.linear_transpose(lambda *t, k=k: tangent_fn(*t)[k], *diff)
    grads.append(transpose(jnp.ones_like(loss)))
  return losses, grads, data


class _Filtered:
  """A differentiated argument split into its inexact leaves and the rest."""

  def __init__(self, tree: Any):
    leaves, self.treedef = jax.tree.flatten(tree)
    self.mask = [_is_inexact_array(x) for x in leaves]
    self.static = [None if m else x for x, m in zip(leaves, self.mask, strict=True)]
    self.diff = [x for x, m in zip(leaves, self.mask, strict=True) if m]

  def combine(self, diff: list[Any]) -> Any:
    it = iter(diff)
    leaves = [next(it) if m else s for s, m in zip(self.static, self.mask, strict=True)]
    return self.treedef.unflatten(leaves)

  def grads(self, diff_grads: list[Any]) -> Any:
    it = iter(diff_grads)
    return self.treedef.unflatten([next(it) if m else None for m in self.mask])


def _nnx_error_hint(err: Exception) -> Exception | None:
  nnx = _nnx()
  errors = sys.modules.get("flax.errors")
  if nnx is None or errors is None or not isinstance(err, errors.TraceContextError):
    return None
  return type(err)(
    f"{err}\n{_API}: a Flax NNX object that fun closes over (not one of its"
    " arguments) was mutated inside the forward pass, e.g. call-time nnx.Rngs"
    " used by Dropout. Pass it to the function as an argument instead, as"
    " nnx.value_and_grad needs too: value_and_grads(loss_fn)(model, batch,"
    " rngs). Its state change is then written back, once per call."
  )


def value_and_grads(
  fun: Callable[..., Any],
  argnums: int | Sequence[int] = 0,
  has_aux: bool = False,
  *,
  wrt: Any = None,
) -> Callable[..., tuple[Any, MainAux | tuple[Any, ...]]]:
  r"""Like ``jax.value_and_grad`` for a function of two (or more) losses.

  ``fun`` returns ``(main_loss, aux_loss)`` (or ``((main_loss, aux_loss),
  aux_data)`` with ``has_aux=True``). The returned function runs ``fun``
  forward ONCE (``jax.linearize``) and pulls back once per loss
  (``jax.linear_transpose`` of that loss's output), so a model with mutable
  state (BatchNorm statistics, dropout keys) steps that state once per call,
  and each backward pass covers only its own loss's graph.

  The differentiated arguments may be:

  * pytrees of float arrays, as for ``jax.grad``. An integer, boolean or
    non-array leaf raises a ``TypeError`` that names its path.
  * Equinox modules (or pytrees holding one): only their inexact-array leaves
    are differentiated; every other leaf (activation functions, integer
    buffers) is ``None`` in the gradients, as with ``eqx.filter_grad``, so
    ``eqx.apply_updates`` takes the result. Pass ``eqx.nn.State``, dropout keys
    and data as further (non-differentiated) arguments.
  * Flax NNX objects (modules, ``nnx.Rngs``, Variables), with the semantics of
    ``nnx.value_and_grad``: the state selected by ``wrt`` (``nnx.Param`` by
    default) is differentiated and returned as an ``nnx.State`` ready for
    ``nnx.Optimizer.update``; every other state change of the forward pass
    (BatchNorm statistics, ``Rngs`` counts, any mutated Variable), in any NNX
    argument, is written back into the objects passed in, once per call,
    eagerly, under ``nnx.jit`` and under ``jax.jit``. NNX objects that ``fun``
    mutates must be arguments, not closed over (a clear error says so).

  Args:
    fun: the function to differentiate.
    argnums: which positional argument(s) to differentiate, as in
      ``jax.grad``.
    has_aux: whether ``fun`` returns ``(losses, aux_data)``.
    wrt: for Flax NNX arguments, the filter of the state to differentiate
      (``nnx.Param`` when ``None``), as in ``nnx.grad``'s ``DiffState``.

  Returns:
    A function with the signature of ``fun`` returning ``(losses, grads)``:
    ``losses`` is ``MainAux(main_loss, aux_loss)`` (or ``(MainAux(...),
    aux_data)`` with ``has_aux``) and ``grads`` is ``MainAux(g_main, g_aux)``,
    each shaped like the differentiated argument(s), ready for
    :func:`bloop_optax.bloop`. If ``fun`` returns more losses, ``(main_loss,
    aux_loss_1, ..., aux_loss_K)``, both are plain tuples of that length, ready
    for :func:`bloop_optax.hierarchical_bloop` and the aggregators.

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
  single = isinstance(argnums, int) or _is_diff_state(argnums)
  entries = (argnums,) if single else tuple(argnums)
  nums, filters = [], {}  # filters: argnum -> the NNX filter a DiffState gave it
  for entry in entries:
    if _is_diff_state(entry):
      if wrt is not None:
        raise TypeError(
          f"{_API}: got both wrt= and an nnx.DiffState in argnums; give the filter once,"
          f" in the DiffState (nnx.DiffState({entry.argnum}, ...)) or in wrt=, not both."
        )
      nums.append(entry.argnum)
      filters[entry.argnum] = entry.filter
    elif isinstance(entry, int) and not isinstance(entry, bool):
      nums.append(entry)
    else:
      raise TypeError(
        f"{_API}: expected argnums to be an int, an nnx.DiffState or a sequence of them;"
        f" got {argnums!r}. For Flax NNX, choose the differentiated state with wrt=,"
        " e.g. wrt=nnx.Param, or nnx.DiffState(argnum, filter) as for nnx.grad."
      )
  nums = tuple(nums)

  def check_has_aux(out: Any) -> tuple[Any, Any]:
    if has_aux and not (isinstance(out, (tuple, list)) and len(out) == 2):
      raise TypeError(
        f"{_API}: has_aux=True expects fun to return ((main_loss, aux_loss),"
        f" aux_data); got {_describe(out)}."
      )
    losses, data = out if has_aux else (out, None)
    return _losses(losses, has_aux), data

  def package(losses, grads, data):
    if len(losses) == 2:
      losses, grads = MainAux(*losses), MainAux(*grads)
    else:
      grads = tuple(grads)
    return ((losses, data) if has_aux else losses), grads

  @functools.wraps(fun)
  def wrapped(*args, **kwargs):
    for n in nums:
      if not -len(args) <= n < len(args):
        raise TypeError(
          f"{_API}: argnums={argnums!r} needs positional argument"
          f" {n}; got {len(args)} positional argument(s)."
        )
    nums_pos = tuple(n % len(args) for n in nums)
    holds_nnx = _holds((args, kwargs), _is_nnx_object)
    tree_mode = holds_nnx and _nnx_tree_mode()
    if holds_nnx and not tree_mode:
      arg_filters = {
        n % len(args): filters.get(n, wrt if wrt is not None else _nnx().Param) for n in nums
      }
      return _nnx_call(fun, args, kwargs, nums_pos, single, arg_filters, check_has_aux, package)
    if wrt is not None or filters:
      given = "wrt=" if wrt is not None else "an nnx.DiffState in argnums"
      raise TypeError(
        f"{_API}: {given} selects Flax NNX state, but "
        + (
          "Flax NNX is in tree mode (nnx.set_graph_mode(False)), where, as with"
          " nnx.value_and_grad, a module is a pytree and every float leaf is"
          " differentiated. Drop it, or differentiate nnx.state(model, filter) (or run"
          " in graph mode)."
          if tree_mode
          else "no argument holds a Flax NNX object. Drop it, or pass the nnx.Module."
        )
      )
    eqx_module = _eqx_module_type()
    filtered = {}
    for n in nums_pos:
      if (eqx_module is not None and _holds(args[n], lambda x: isinstance(x, eqx_module))) or (
        tree_mode and _holds(args[n], _is_nnx_object)
      ):
        filtered[n] = _Filtered(args[n])
      else:
        _check_differentiable(args[n], f"argument {n} (in argnums)")
    # The other arguments are closed over. Rebuilding their pytrees inside the
    # traced function gives pytree nodes that record the inner trace.
    leaves, treedef = jax.tree.flatten((args, kwargs))

    def restricted(*diff_args):
      full_args, full_kwargs = jax.tree.unflatten(treedef, leaves)
      full_args = list(full_args)
      for n, value in zip(nums_pos, diff_args, strict=True):
        full_args[n] = filtered[n].combine(value) if n in filtered else value
      losses, data = check_has_aux(fun(*full_args, **full_kwargs))
      if tree_mode:  # the Variables' values after the forward pass, to write back
        data = (data, [_get(v) for v in _variables((full_args, full_kwargs))])
      return losses, data

    diff = tuple(filtered[n].diff if n in filtered else args[n] for n in nums_pos)
    losses, grads, data = _one_forward(restricted, diff)
    if tree_mode:
      data, values = data
      for variable, value in zip(_variables((args, kwargs)), values, strict=True):
        _set(variable, value)
    grads = [
      tuple(
        filtered[n].grads(g_n) if n in filtered else g_n for n, g_n in zip(nums_pos, g, strict=True)
      )
      for g in grads
    ]
    return package(losses, [g[0] if single else g for g in grads], data)

  return wrapped


def _nnx_call(fun, args, kwargs, nums_pos, single, arg_filters, check_has_aux, package):
  """``value_and_grads`` when an argument holds Flax NNX objects (graph mode);
  ``arg_filters`` maps each differentiated argument to the filter of its state."""
  nnx = _nnx()
  filterlib = sys.modules["flax.nnx.filterlib"]
  keeps = {n: filterlib.to_predicate(f) for n, f in arg_filters.items()}
  arg_flat = [jax.tree.flatten(a, is_leaf=_is_nnx_object) for a in args]
  kw_flat, kw_def = jax.tree.flatten(kwargs, is_leaf=_is_nnx_object)
  # Every NNX object of every argument, split together (shared references
  # stay shared), those of the differentiated arguments first.
  order = list(nums_pos) + [i for i in range(len(args)) if i not in nums_pos]
  nodes, where = [], {}
  for i in order:
    for j, leaf in enumerate(arg_flat[i][0]):
      if _is_nnx_object(leaf):
        where[(i, j)] = len(nodes)
        nodes.append(leaf)
  for j, leaf in enumerate(kw_flat):
    if _is_nnx_object(leaf):
      where[("kw", j)] = len(nodes)
      nodes.append(leaf)
  node_arg = {k: i for (i, _), k in where.items()}  # node index -> its argument

  def is_diff(path, value):
    n = node_arg[path[0]]
    return n in keeps and keeps[n](path[1:], value)

  graphdef, diff_state, rest_state = nnx.split(tuple(nodes), is_diff, ...)
  plain = {}  # the non-NNX leaves of the differentiated arguments
  for n in nums_pos:
    leaves = [x for j, x in enumerate(arg_flat[n][0]) if (n, j) not in where]
    _check_differentiable(leaves, f"argument {n} (in argnums), its non-NNX leaf")
    plain[n] = leaves

  def rebuild(new_nodes, plain_values):
    out_args = []
    for i, (leaves, tdef) in enumerate(arg_flat):
      it = iter(plain_values.get(i, ()))
      fresh = [
        new_nodes[where[(i, j)]] if (i, j) in where else (next(it) if i in plain_values else x)
        for j, x in enumerate(leaves)
      ]
      out_args.append(tdef.unflatten(fresh))
    fresh_kw = [
      new_nodes[where[("kw", j)]] if ("kw", j) in where else x for j, x in enumerate(kw_flat)
    ]
    return out_args, kw_def.unflatten(fresh_kw)

  # Rebuilt inside the trace: Variables made there may be mutated there.
  rest_leaves, rest_def = jax.tree.flatten(rest_state)

  def restricted(diff_state, plain_values):
    rest = jax.tree.unflatten(rest_def, rest_leaves)
    new_nodes = nnx.merge(graphdef, diff_state, rest)
    full_args, full_kwargs = rebuild(new_nodes, plain_values)
    losses, data = check_has_aux(fun(*full_args, **full_kwargs))
    if _holds(data, _is_nnx_graph_object):
      raise TypeError(
        f"{_API}: fun's aux_data holds a Flax NNX module or Rngs; return its state"
        " (nnx.state(obj)) or arrays instead. The objects passed as arguments"
        " are updated in place."
      )
    return losses, (data, nnx.state(new_nodes))

  try:
    losses, grads, (data, new_state) = _one_forward(restricted, (diff_state, plain))
  except Exception as err:
    hinted = _nnx_error_hint(err)
    if hinted is None:
      raise
    raise hinted from err
  nnx.update(tuple(nodes), new_state)

  def per_argument(g):
    g_state, g_plain = g
    out = []
    for n in nums_pos:
      leaves, tdef = arg_flat[n]
      it = iter(g_plain[n])
      fresh = []
      for j, _ in enumerate(leaves):
        if (n, j) in where:
          k = where[(n, j)]
          fresh.append(g_state[k] if k in g_state else nnx.State({}))
        else:
          fresh.append(next(it))
      out.append(tdef.unflatten(fresh))
    return out[0] if single else tuple(out)

  return package(losses, [per_argument(g) for g in grads], data)
