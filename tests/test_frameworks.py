"""value_and_grads inside Flax NNX, Flax linen and Equinox code written as those
frameworks' own examples write it: the framework's state advances exactly as
under its own grad, and with aux_weight = 0 the step IS the framework's step."""

import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bloop_optax
from tests.helpers import assert_trees_close
from tests.helpers import blocks
from tests.helpers import data

pytestmark = pytest.mark.optax_optimizer
ROOT = pathlib.Path(__file__).parent.parent


def page_code(name):
  (code,) = blocks((ROOT / "docs" / f"{name}.md").read_text(), "python")
  return code


def load_page(name):
  """The docs page's example, defined but not run (its __main__ part is skipped)."""
  pytest.importorskip("sklearn")
  namespace = {"__name__": f"docs_{name}"}
  exec(compile(page_code(name), f"docs/{name}.md", "exec"), namespace)
  return namespace


# The identity tests train with SGD: the two steps' gradients are computed by two
# different XLA programs and agree to rounding, and Adam amplifies rounding in
# entries whose true gradient is zero (a bias right before BatchNorm) to full
# +-lr steps. The Adam step itself is the same function of the direction.
SGD = optax.sgd(0.05, momentum=0.9)


@pytest.mark.slow  # each page's training script, a minute in all: the slow tier
@pytest.mark.parametrize("name", ["flax_nnx", "flax_linen", "equinox"])
def test_page_example_accuracy_matches_the_framework_step(name):
  """The page's own script, as a user runs it: Bloop's held-out accuracy is within
  a few points of the unmodified framework step's."""
  pytest.importorskip("sklearn")
  if name == "equinox":
    pytest.importorskip("equinox")
  done = subprocess.run(
    [sys.executable, "-c", page_code(name)], capture_output=True, text=True, timeout=600
  )
  assert done.returncode == 0, done.stderr[-3000:]
  own, bloop = map(float, re.findall(r"(\d\.\d+)", done.stdout.splitlines()[-1]))
  assert own > 0.9, done.stdout
  assert abs(bloop - own) < 0.05, done.stdout


# ------------------------------------------------------------------ Flax NNX


def nnx_net():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs, stored_rngs=None):
      self.dense = nnx.Linear(5, 16, rngs=rngs)
      self.norm = nnx.BatchNorm(16, momentum=0.5, rngs=rngs)
      self.drop = nnx.Dropout(0.3, rngs=stored_rngs)
      self.head = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x, rngs=None):
      return self.head(self.drop(nnx.relu(self.norm(self.dense(x))), rngs=rngs))[:, 0]

  return Net


def nnx_losses(model, x, y, rngs=None):
  from flax import nnx

  pred = model(x, rngs)
  main = jnp.mean((pred - y) ** 2)
  aux = 0.5 * sum(jnp.sum(p**2) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  return (main, aux), pred


def count(rngs, stream="default"):
  """The draw count of one stream of an nnx.Rngs (or of a stream itself)."""
  from flax import nnx

  stream = getattr(rngs, stream) if isinstance(rngs, nnx.Rngs) else rngs
  return int(stream.count[...])


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "nnx.jit"])
def test_nnx_call_time_rngs_as_nnx_value_and_grad(jit):
  """Flax's MNIST style (rngs passed at call time): BatchNorm statistics, the RNG
  count and the main gradient equal nnx.value_and_grad's, call after call."""
  from flax import nnx

  Net = nnx_net()
  ours_model, theirs_model = Net(nnx.Rngs(0)), Net(nnx.Rngs(0))
  ours_rngs, theirs_rngs = nnx.Rngs(7), nnx.Rngs(7)
  x, y = data()

  def main_only(model, x, y, rngs):
    (main, _), pred = nnx_losses(model, x, y, rngs)
    return main, pred

  ours = bloop_optax.value_and_grads(nnx_losses, has_aux=True)
  theirs = nnx.value_and_grad(main_only, has_aux=True)
  aux_grad = nnx.grad(lambda m, x, y, r: nnx_losses(m, x, y, r)[0][1])
  if jit:
    ours, theirs = nnx.jit(ours), nnx.jit(theirs)
  previous = None
  for call in range(1, 4):
    before = nnx.clone(ours_model)
    ((main, aux), pred), grads = ours(ours_model, x, y, ours_rngs)
    (main_ref, pred_ref), grads_ref = theirs(theirs_model, x, y, theirs_rngs)

    assert isinstance(grads, bloop_optax.MainAux) and isinstance(grads.main, nnx.State)
    assert_trees_close(grads.main, grads_ref)
    np.testing.assert_allclose(main, main_ref, rtol=1e-6)
    np.testing.assert_allclose(pred, pred_ref, rtol=1e-6)
    assert count(ours_rngs) == count(theirs_rngs) == call  # one draw per call
    assert_trees_close(nnx.state(ours_model, nnx.BatchStat), nnx.state(theirs_model, nnx.BatchStat))
    # The aux gradient is nnx.grad's of the aux loss, from the state before the call.
    assert_trees_close(grads.aux, aux_grad(before, x, y, nnx.Rngs(0)))
    if previous is not None:  # a fresh dropout mask each call
      assert not np.allclose(pred, previous)
    previous = pred


def test_nnx_rngs_stored_in_the_model_and_the_optimizer_step():
  """Dropout holding its own Rngs (the other NNX style) inside nnx.Optimizer."""
  from flax import nnx

  Net = nnx_net()
  model = Net(nnx.Rngs(0), stored_rngs=nnx.Rngs(dropout=3))
  twin = Net(nnx.Rngs(0), stored_rngs=nnx.Rngs(dropout=3))
  tx = optax.chain(bloop_optax.bloop(0.0), optax.sgd(0.05))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  twin_optimizer = nnx.Optimizer(twin, optax.sgd(0.05), wrt=nnx.Param)
  x, y = data()

  @nnx.jit
  def step(model, optimizer):
    ((main, _), _), grads = bloop_optax.value_and_grads(nnx_losses, has_aux=True)(model, x, y)
    optimizer.update(model, grads)
    return main

  @nnx.jit
  def own_step(model, optimizer):
    (main, _), grads = nnx.value_and_grad(
      lambda m: (nnx_losses(m, x, y)[0][0], None), has_aux=True
    )(model)
    optimizer.update(model, grads)
    return main

  losses = [float(step(model, optimizer)) for _ in range(5)]
  for _ in range(5):
    own_step(twin, twin_optimizer)
  assert count(model.drop.rngs) == count(twin.drop.rngs) == 5
  assert_trees_close(nnx.state(model), nnx.state(twin))
  assert losses[-1] < losses[0]


def test_nnx_under_jax_jit_with_split_and_merge():
  """Plain jax.jit: the merged objects carry the forward pass's state out."""
  from flax import nnx

  Net = nnx_net()
  model, rngs = Net(nnx.Rngs(0)), nnx.Rngs(5)
  ref_model, ref_rngs = Net(nnx.Rngs(0)), nnx.Rngs(5)
  x, y = data()
  graphdef, state = nnx.split((model, rngs))

  @jax.jit
  def step(state):
    model, rngs = nnx.merge(graphdef, state)
    (_, _), grads = bloop_optax.value_and_grads(nnx_losses, has_aux=True)(model, x, y, rngs)
    return nnx.state((model, rngs)), grads

  for _ in range(2):
    state, grads = step(state)
    nnx.grad(lambda m, r: nnx_losses(m, x, y, r)[0][0])(ref_model, ref_rngs)
  nnx.update((model, rngs), state)
  assert count(rngs) == count(ref_rngs) == 2
  assert_trees_close(nnx.state(model), nnx.state(ref_model))


def test_nnx_wrt_filter_and_argnums():
  from flax import nnx

  class Scale(nnx.Variable):
    pass

  class Net(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.ones(3))
      self.s = Scale(jnp.asarray(2.0))

    def __call__(self, x):
      return self.s[...] * (x @ self.w[...])

  x = jnp.arange(3.0)

  def losses(model, shift):
    out = model(x) + shift
    return out**2, jnp.abs(out)

  model = Net()
  _, grads = bloop_optax.value_and_grads(losses, wrt=Scale)(model, jnp.asarray(0.0))
  assert set(grads.main.keys()) == {"s"}
  np.testing.assert_allclose(grads.main["s"][...], 2 * 6.0 * 3.0)  # d(s (x @ w))^2 / ds, x @ w = 3
  _, grads = bloop_optax.value_and_grads(losses, argnums=(0, 1))(model, jnp.asarray(1.0))
  g_model, g_shift = grads.main
  assert set(g_model.keys()) == {"w"}
  np.testing.assert_allclose(g_shift, 2 * 7.0)
  np.testing.assert_allclose(g_model["w"][...], 2 * 7.0 * 2.0 * x)


def test_nnx_closed_over_rngs_is_a_clear_error():
  from flax import nnx

  Net = nnx_net()
  model, rngs = Net(nnx.Rngs(0)), nnx.Rngs(1)
  x, y = data()
  with pytest.raises(Exception, match="Pass it to the function as an argument"):
    bloop_optax.value_and_grads(lambda m: nnx_losses(m, x, y, rngs), has_aux=True)(model)
  assert count(rngs) == 0


def test_nnx_page_zero_weight_is_flax_own_step():
  from flax import nnx

  page = load_page("flax_nnx")
  ours, ours_rngs, _ = page["train"](page["bloop_step"], aux_weight=0.0, steps=12, update_rule=SGD)
  theirs, theirs_rngs, _ = page["train"](page["flax_step"], steps=12, update_rule=SGD)
  assert count(ours_rngs) == count(theirs_rngs) == 12
  assert_trees_close(nnx.state(ours, nnx.Param), nnx.state(theirs, nnx.Param))
  assert_trees_close(nnx.state(ours, nnx.BatchStat), nnx.state(theirs, nnx.BatchStat))


def test_nnx_page_state_advances_as_under_nnx_grad_with_aux_weight():
  """aux_weight > 0 changes the parameters, never how BatchNorm and Rngs advance."""
  from flax import nnx

  page = load_page("flax_nnx")
  ours, ours_rngs, _ = page["train"](page["bloop_step"], aux_weight=1.0, steps=1)
  theirs, theirs_rngs, _ = page["train"](page["flax_step"], steps=1)
  assert count(ours_rngs) == count(theirs_rngs) == 1
  # One step from the same initialisation: the statistics come from the forward
  # pass before the update, so they agree exactly; the parameters do not.
  assert_trees_close(nnx.state(ours, nnx.BatchStat), nnx.state(theirs, nnx.BatchStat))
  kernel = lambda m: np.asarray(m.linear1.kernel[...])
  assert not np.allclose(kernel(ours), kernel(theirs))


# ------------------------------------------------------------------ Flax linen


def test_linen_page_zero_weight_is_flax_own_step():
  page = load_page("flax_linen")
  ours, _ = page["train"](page["bloop_step"], aux_weight=0.0, steps=12, update_rule=SGD)
  theirs, _ = page["train"](page["flax_step"], steps=12, update_rule=SGD)
  assert int(ours.step) == int(theirs.step) == 12
  assert_trees_close(ours.params, theirs.params)
  assert_trees_close(ours.batch_stats, theirs.batch_stats)


# ------------------------------------------------------------------ Equinox


def test_equinox_mlp_both_gradients_in_one_forward_pass():
  eqx = pytest.importorskip("equinox")
  model = eqx.nn.MLP(3, 1, 8, 2, key=jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (16, 3))
  y = x[:, 0] - 2 * x[:, 1]
  calls = []

  def losses(model, x, y):
    calls.append(1)
    main = jnp.mean((jax.vmap(model)(x)[:, 0] - y) ** 2)
    aux = 0.5 * sum(jnp.sum(p**2) for p in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))
    return main, aux

  (main, aux), grads = bloop_optax.value_and_grads(losses)(model, x, y)
  assert len(calls) == 1
  assert_trees_close(grads.main, eqx.filter_grad(lambda m: losses(m, x, y)[0])(model))
  assert_trees_close(grads.aux, eqx.filter_grad(lambda m: losses(m, x, y)[1])(model))
  assert grads.main.activation is None  # non-array leaves are left out, as in Equinox

  tx = optax.chain(bloop_optax.bloop(0.01), optax.adam(1e-2))
  opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))

  @eqx.filter_jit
  def step(model, opt_state):
    (main, _), grads = bloop_optax.value_and_grads(losses)(model, x, y)
    updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, updates), opt_state, main

  for _ in range(150):
    model, opt_state, last = step(model, opt_state)
  assert float(last) < 0.3 * float(main)


def test_equinox_integer_buffers_and_static_fields_are_left_out():
  eqx = pytest.importorskip("equinox")

  class Counted(eqx.Module):
    w: jax.Array
    calls: jax.Array  # an integer buffer
    name: str = eqx.field(static=True)
    act: object = jax.nn.tanh

    def __call__(self, x):
      return self.act(x @ self.w)

  model = Counted(jnp.ones(3), jnp.zeros((), jnp.int32), "net")
  x = jnp.arange(3.0)
  _, grads = bloop_optax.value_and_grads(lambda m: (m(x) ** 2, m(x)))(model)
  assert grads.main.calls is None and grads.main.act is None
  want = eqx.filter_grad(lambda m: m(x) ** 2)(model)
  np.testing.assert_allclose(grads.main.w, want.w, rtol=1e-6)


def test_equinox_page_zero_weight_is_equinox_own_step():
  pytest.importorskip("equinox")
  page = load_page("equinox")
  ours, ours_state, _ = page["train"](aux_weight=0.0, steps=12, update_rule=SGD)
  theirs, theirs_state, _ = page["train"](steps=12, update_rule=SGD)
  eqx = sys.modules["equinox"]
  assert_trees_close(
    eqx.filter(ours, eqx.is_inexact_array), eqx.filter(theirs, eqx.is_inexact_array)
  )
  assert_trees_close(ours_state, theirs_state)


def test_equinox_init_on_the_whole_module_says_to_filter():
  eqx = pytest.importorskip("equinox")
  model = eqx.nn.MLP(3, 1, 8, 2, key=jax.random.key(0))
  with pytest.raises(TypeError, match=r"leaf at .*activation.*eqx\.filter\(model"):
    bloop_optax.bloop(0.1).init(model)


# ------------------------------------------------------------------ errors


def test_integer_and_non_array_leaves_name_their_path_and_the_fix():
  fun = lambda p: (jnp.sum(p["w"]), jnp.sum(p["w"] ** 2))
  for bad, what in [
    (jnp.zeros((), jnp.int32), r"\['step'\] is an integer or boolean leaf, an array int32\[\]"),
    (jnp.array([True]), r"\['step'\] is an integer or boolean leaf, an array bool\[1\]"),
    (3, r"\['step'\] is an integer or boolean leaf"),
    (jnp.tanh, r"\['step'\] is a non-array leaf"),
  ]:
    with pytest.raises(TypeError, match=what) as info:
      bloop_optax.value_and_grads(fun)({"w": jnp.ones(2), "step": bad})
    assert "not in argnums" in str(info.value) and "eqx.partition" in str(info.value)
  # The same value as a non-differentiated argument is fine.
  (main, _), _ = bloop_optax.value_and_grads(lambda w, s: fun({"w": w * s}))(jnp.ones(2), 3)
  assert float(main) == 6.0


def test_pair_mistakes_are_short_and_name_the_difference():
  tx = bloop_optax.bloop(0.1)
  params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
  state = tx.init(params)
  with pytest.raises(TypeError) as info:
    tx.update(params, state)  # a single gradient
  message = str(info.value)
  assert "a dict with keys ['b', 'w']" in message and "PyTreeDef" not in message
  assert len(message) < 500
  bad_aux = {"w": jnp.ones(4), "b": jnp.zeros(2)}
  with pytest.raises(ValueError, match=r"at key path \['w'\]: shape \(3,\) vs \(4,\)"):
    tx.update(bloop_optax.MainAux(params, bad_aux), state)
  with pytest.raises(ValueError, match=r"key path \['w'\] vs \['c'\]"):
    tx.update(bloop_optax.MainAux(params, {**params, "c": jnp.ones(1)}), state)


def test_nnx_forward_pass_runs_once_per_call():
  from flax import nnx

  Net = nnx_net()
  model, rngs = Net(nnx.Rngs(0)), nnx.Rngs(1)
  x, y = data()
  calls = []

  def counted(model, x, y, rngs):
    calls.append(1)
    return nnx_losses(model, x, y, rngs)

  grad_fn = bloop_optax.value_and_grads(counted, has_aux=True)
  grad_fn(model, x, y, rngs)
  assert len(calls) == 1 and count(rngs) == 1
  jitted = nnx.jit(grad_fn)
  jitted(model, x, y, rngs)
  jitted(model, x, y, rngs)
  assert len(calls) == 2 and count(rngs) == 3  # one trace; the count moves every call
