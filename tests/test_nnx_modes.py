"""value_and_grads behaves as nnx.value_and_grad in Flax NNX's graph mode and in
its tree mode (``nnx.set_graph_mode(False)``): the same gradients, of the same
type, and the same state written back; and it takes ``nnx.DiffState`` argnums
as nnx.grad does."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bloop_optax
from tests.helpers import assert_trees_close
from tests.helpers import data

nnx = pytest.importorskip("flax.nnx")
pytestmark = pytest.mark.optax_optimizer

HAS_TREE_MODE = hasattr(nnx, "set_graph_mode")
MODES = [
  "graph",
  pytest.param(
    "tree",
    marks=pytest.mark.skipif(not HAS_TREE_MODE, reason="this flax has no tree mode"),
  ),
]


def mode(name):
  if name == "graph" and not HAS_TREE_MODE:
    return contextlib.nullcontext()
  return nnx.set_graph_mode(name == "graph")


class Net(nnx.Module):
  """BatchNorm statistics that the forward pass updates, and no Rngs (tree-mode
  nnx.value_and_grad cannot differentiate a module holding integer RNG counts)."""

  def __init__(self, rngs):
    self.dense = nnx.Linear(5, 16, rngs=rngs)
    self.norm = nnx.BatchNorm(16, momentum=0.5, rngs=rngs)
    self.head = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.norm(self.dense(x))))[:, 0]


def losses(model, x, y):
  pred = model(x)
  main = jnp.mean((pred - y) ** 2)
  aux = 0.5 * sum(jnp.sum(p**2) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  return main, aux


def main_loss(model, x, y):
  return losses(model, x, y)[0]


@pytest.mark.parametrize("name", MODES)
def test_gradients_type_and_written_back_state_as_nnx_value_and_grad(name):
  x, y = data()
  with mode(name):
    theirs, ours = Net(nnx.Rngs(0)), Net(nnx.Rngs(0))
    loss, grads = nnx.value_and_grad(main_loss)(theirs, x, y)
    (main, _), pair = bloop_optax.value_and_grads(losses)(ours, x, y)
  np.testing.assert_allclose(main, loss, rtol=1e-6)
  assert type(pair.main) is type(grads)  # nnx.State in graph mode, the module in tree mode
  if name == "graph":
    assert_trees_close(pair.main, grads)
  else:
    # Tree mode differentiates every float leaf, as jax.grad of the module does,
    # BatchNorm's statistics included.
    assert_trees_close(pair.main, grads, atol=1e-6)
    assert jax.tree.structure(pair.main) == jax.tree.structure(grads)
  assert_trees_close(nnx.state(ours), nnx.state(theirs))  # the statistics moved once
  assert not np.allclose(ours.norm.mean[...], 0.0)


@pytest.mark.parametrize("name", MODES)
def test_zero_weight_step_is_flax_own_step_in_each_mode(name):
  """nnx.Optimizer and nnx.jit as Flax's examples write the step: with
  aux_weight = 0 the Bloop step is that step, in either mode."""
  x, y = data()

  with mode(name):

    @nnx.jit
    def flax_step(model, optimizer, x, y):
      loss, grads = nnx.value_and_grad(main_loss)(model, x, y)
      optimizer.update(model, grads)
      return loss

    @nnx.jit
    def bloop_step(model, optimizer, x, y):
      (main, _), grads = bloop_optax.value_and_grads(losses)(model, x, y)
      optimizer.update(model, grads)
      return main

    sgd = optax.sgd(0.05, momentum=0.9)
    theirs, ours = Net(nnx.Rngs(0)), Net(nnx.Rngs(0))
    opt_theirs = nnx.Optimizer(theirs, sgd, wrt=nnx.Param)
    opt_ours = nnx.Optimizer(ours, optax.chain(bloop_optax.bloop(0.0), sgd), wrt=nnx.Param)
    for _ in range(3):
      np.testing.assert_allclose(
        bloop_step(ours, opt_ours, x, y), flax_step(theirs, opt_theirs, x, y), rtol=1e-5
      )
  assert_trees_close(nnx.state(ours), nnx.state(theirs))


class Dropped(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(5, 4, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    return self.drop(self.dense(x))


@pytest.mark.skipif(not HAS_TREE_MODE, reason="this flax has no tree mode")
def test_tree_mode_module_with_rngs_differentiates_its_float_leaves_and_advances_counts():
  x, _ = data()

  def dropped_losses(model, x):
    out = model(x)
    return jnp.mean(out**2), jnp.mean(out)

  with nnx.set_graph_mode(False):
    model = Dropped(nnx.Rngs(0, dropout=1))
    before = int(model.drop.rngs.count[...])
    _, pair = bloop_optax.value_and_grads(dropped_losses)(model, x)
    assert int(model.drop.rngs.count[...]) == before + 1  # one forward pass, one draw
    assert type(pair.main) is Dropped
    # The float leaves are differentiated (integer RNG state is None, as with
    # eqx.filter_grad); the kernel's gradient is that of the masked forward pass.
    assert pair.main.drop.rngs.count.get_value() is None
    assert pair.main.dense.kernel[...].shape == (5, 4)
    assert np.any(np.asarray(pair.main.dense.kernel[...]) != 0)
    with pytest.raises(TypeError, match="tree mode"):
      bloop_optax.value_and_grads(dropped_losses, wrt=nnx.Param)(model, x)


@pytest.mark.parametrize(
  "diff_filter",
  [nnx.Param, nnx.All(nnx.Param, nnx.PathContains("head"))],
  ids=["params", "head only"],
)
def test_diff_state_argnums_as_nnx_grad(diff_filter):
  x, y = data()
  theirs, ours = Net(nnx.Rngs(0)), Net(nnx.Rngs(0))
  argnums = nnx.DiffState(0, diff_filter)
  with mode("graph"):
    grads = nnx.grad(main_loss, argnums=argnums)(theirs, x, y)
    _, pair = bloop_optax.value_and_grads(losses, argnums=argnums)(ours, x, y)
  assert type(pair.main) is type(grads)
  assert_trees_close(pair.main, grads)
  assert_trees_close(nnx.state(ours), nnx.state(theirs))


def test_diff_state_in_a_sequence_and_with_wrt():
  x, y = data()
  model = Net(nnx.Rngs(0))

  def shifted(model, shift):
    return losses(model, x, y + shift)

  shift = jnp.asarray(0.5)
  argnums = (nnx.DiffState(0, nnx.PathContains("head")), 1)
  _, pair = bloop_optax.value_and_grads(shifted, argnums=argnums)(model, shift)
  g_model, g_shift = pair.main
  assert set(g_model.keys()) == {"head"}
  want = jax.grad(lambda s: shifted(Net(nnx.Rngs(0)), s)[0])(shift)
  np.testing.assert_allclose(g_shift, want, rtol=1e-5)
  with pytest.raises(TypeError, match="DiffState"):
    bloop_optax.value_and_grads(losses, argnums=nnx.DiffState(0, nnx.Param), wrt=nnx.Param)
