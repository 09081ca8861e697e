"""Every gradient of a function of several losses from one forward pass.

The core here runs the forward pass once and one backward pass per loss; the
arguments are adapted by one small adapter per kind (``_grads_pytree``,
``_grads_equinox``, ``_grads_nnx``), each of one shape: what is differentiated,
the call that rebuilds the arguments inside the trace, the state written back,
the gradients per argument. Three kinds of differentiated argument are
understood:

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
from typing import Any

import jax
import jax.numpy as jnp

from bloop_optax import _checks
from bloop_optax import _grads_nnx
from bloop_optax import _grads_pytree
from bloop_optax import _linear_parts
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


# ------------------------------------------------------------------ the core


def _one_forward(restricted: Callable[..., Any], diff: tuple[Any, ...]):
  """Runs ``restricted(*diff) -> (losses, data)`` once; a gradient per loss.

  Each loss is pulled back alone through the equations of the linearization it
  depends on (:mod:`bloop_optax._linear_parts`): a regulariser's gradient costs
  no backward pass through the network, a task head's loss none through the
  other heads. Where the linearization's jaxpr cannot be read that way, each
  loss is transposed through the whole linearization (the other losses'
  cotangents symbolic zeros).
  """
  losses, tangent_fn, data = jax.linearize(restricted, *diff, has_aux=True)
  leaves, treedef = jax.tree.flatten(diff)
  try:
    per_loss = _linear_parts.pullbacks(tangent_fn, leaves, treedef, losses)
    return losses, [jax.tree.unflatten(treedef, g) for g in per_loss], data
  except Exception:  # noqa: BLE001 (an unreadable linearization: transpose it whole)
    pass
  grads = []
  for k, loss in enumerate(losses):
    transpose = jax.linear_transpose(lambda *t, k=k: tangent_fn(*t)[k], *diff)
    grads.append(transpose(jnp.ones_like(loss)))
  return losses, grads, data


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
  single = isinstance(argnums, int) or _grads_nnx.is_diff_state(argnums)
  entries = (argnums,) if single else tuple(argnums)
  nums, filters = [], {}  # filters: argnum -> the NNX filter a DiffState gave it
  for entry in entries:
    if _grads_nnx.is_diff_state(entry):
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

  def call_fun(*args, **kwargs):
    return check_has_aux(fun(*args, **kwargs))

  @functools.wraps(fun)
  def wrapped(*args, **kwargs):
    for n in nums:
      if not -len(args) <= n < len(args):
        raise TypeError(
          f"{_API}: argnums={argnums!r} needs positional argument"
          f" {n}; got {len(args)} positional argument(s)."
        )
    nums_pos = tuple(n % len(args) for n in nums)
    holds_nnx = _checks.holds((args, kwargs), _grads_nnx.is_object)
    tree_mode = holds_nnx and _grads_nnx.tree_mode()
    if holds_nnx and not tree_mode:
      nnx_filter = wrt if wrt is not None else _grads_nnx.nnx().Param
      arg_filters = {n % len(args): filters.get(n, nnx_filter) for n in nums}
      adapter = _grads_nnx.GraphCall(args, kwargs, nums_pos, arg_filters)
    elif wrt is not None or filters:
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
    else:
      adapter = _grads_pytree.PytreeCall(args, kwargs, nums_pos, tree_mode)
    try:
      losses, grads, data = _one_forward(lambda *d: adapter.call(call_fun, d), adapter.diff)
    except Exception as err:
      hinted = _grads_nnx.error_hint(err)
      if hinted is None:
        raise
      raise hinted from err
    data = adapter.finish(data)
    grads = [adapter.grads(g) for g in grads]
    return package(losses, [g[0] if single else g for g in grads], data)

  return wrapped
