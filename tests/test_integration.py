"""The pair in real training steps: one forward pass, Flax, accumulation, resume."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bloop_optax
from bloop_optax import MainAux

pytestmark = pytest.mark.optax_optimizer


def regression_data(seed=0, n=64, d=5):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
  y = jnp.asarray(x @ rng.standard_normal(d) + 0.1 * rng.standard_normal(n), jnp.float32)
  return x, y


def losses(params, x, y):
  pred = jnp.tanh(x @ params["w1"]) @ params["w2"] + params["b"]
  main = jnp.mean((pred - y) ** 2)
  aux = 0.5 * sum(jnp.sum(p**2) for p in jax.tree.leaves(params))
  return main, aux


def init_params(seed=1, d=5, h=8):
  rng = np.random.default_rng(seed)
  return {
    "w1": jnp.asarray(rng.standard_normal((d, h)) / np.sqrt(d), jnp.float32),
    "w2": jnp.asarray(rng.standard_normal(h) / np.sqrt(h), jnp.float32),
    "b": jnp.zeros((), jnp.float32),
  }


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- value_and_grads


def test_value_and_grads_equals_two_grad_calls():
  params, (x, y) = init_params(), regression_data()
  (main, aux), grads = jax.jit(bloop_optax.value_and_grads(losses))(params, x, y)
  want_main = jax.grad(lambda p: losses(p, x, y)[0])(params)
  want_aux = jax.grad(lambda p: losses(p, x, y)[1])(params)
  assert isinstance(grads, MainAux)
  assert_trees_close(grads.main, want_main)
  assert_trees_close(grads.aux, want_aux)
  want = losses(params, x, y)
  np.testing.assert_allclose([main, aux], want, rtol=1e-6)


def test_value_and_grads_argnums_and_has_aux():
  params, (x, y) = init_params(), regression_data()

  def fun(p, x, y):
    main, aux = losses(p, x, y)
    return (main, aux), {"n": x.shape[0]}

  ((main, aux), data), grads = bloop_optax.value_and_grads(fun, argnums=(0, 1), has_aux=True)(
    params, x, y
  )
  assert data == {"n": 64}
  g_main = jax.grad(lambda p, x: losses(p, x, y)[0], argnums=(0, 1))(params, x)
  g_aux = jax.grad(lambda p, x: losses(p, x, y)[1], argnums=(0, 1))(params, x)
  assert_trees_close(grads.main, g_main)
  assert_trees_close(grads.aux, g_aux)


def test_value_and_grads_with_several_aux_losses():
  params, (x, y) = init_params(), regression_data()

  def three(p):
    main, l2 = losses(p, x, y)
    return main, l2, jnp.sum(jnp.abs(p["w2"]))

  values, grads = jax.jit(bloop_optax.value_and_grads(three))(params)
  assert isinstance(grads, tuple) and len(grads) == 3 and not isinstance(grads, MainAux)
  for k in range(3):
    assert_trees_close(grads[k], jax.grad(lambda p, k=k: three(p)[k])(params))
  np.testing.assert_allclose(values, three(params), rtol=1e-6)


def test_weight_sweep_in_one_compiled_program():
  """vmap over aux_weight (and seeds): the pattern the experiment runner uses.

  A traced aux_weight goes straight into the factory; one compiled program
  trains every (weight, seed) and equals separate runs.
  """
  x, y = regression_data()
  grad_fn = bloop_optax.value_and_grads(losses)

  def train(aux_weight, seed):
    params = jax.tree.map(
      lambda p: p + 0.1 * jax.random.normal(jax.random.key(seed), p.shape), init_params()
    )
    tx = optax.chain(bloop_optax.bloop(aux_weight, ema_decay=0.9), optax.adam(1e-2))

    def step(carry, _):
      p, s = carry
      _, g = grad_fn(p, x, y)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=30)
    return params

  weights = jnp.array([0.0, 0.3, 3.0, 0.0, 0.3, 3.0])
  seeds = jnp.array([0, 0, 0, 1, 1, 1])
  swept = jax.jit(jax.vmap(train))(weights, seeds)
  for i in range(6):
    one = jax.jit(train)(weights[i], seeds[i])
    assert_trees_close(jax.tree.map(lambda v, i=i: v[i], swept), one, rtol=1e-4, atol=1e-5)
  norms = [float(jnp.sum(swept["w1"][i] ** 2)) for i in range(3)]
  assert norms[0] > norms[2]  # a larger aux weight shrinks the weights


def test_fun_runs_forward_once():
  calls = []

  def counted(p, x, y):
    calls.append(1)
    return losses(p, x, y)

  params, (x, y) = init_params(), regression_data()
  bloop_optax.value_and_grads(counted)(params, x, y)
  assert len(calls) == 1
  jax.jit(bloop_optax.value_and_grads(counted))(params, x, y)
  assert len(calls) == 2  # one trace under jit


def test_each_backward_pass_covers_only_its_own_loss():
  """A regulariser's gradient costs no second backward pass through the net.

  Counted, not timed: the matrix products of value_and_grads equal those of
  jax.value_and_grad on the main loss alone (the L2 aux adds none). Pulling
  (0, 1) back through the joint vjp instead would add a full backward pass.
  """
  params, (x, y) = init_params(), regression_data()

  def dots(fn):
    return str(jax.make_jaxpr(fn)(params)).count("dot_general")

  helper = dots(lambda p: bloop_optax.value_and_grads(losses)(p, x, y))
  main_only = dots(lambda p: jax.value_and_grad(lambda p: losses(p, x, y)[0])(p))
  assert helper == main_only > 0


def test_value_and_grads_bad_returns():
  with pytest.raises(
    TypeError, match=r"expected fun to return \(main_loss, aux_loss\).*has_aux=True"
  ):
    bloop_optax.value_and_grads(lambda w: jnp.sum(w))(jnp.ones(2))
  with pytest.raises(TypeError, match=r"expected aux_loss to be a scalar; got shape \(2,\)"):
    bloop_optax.value_and_grads(lambda w: (jnp.sum(w), w))(jnp.ones(2))
  with pytest.raises(
    TypeError,
    match=r"has_aux=True expects fun to return \(\(main_loss, aux_loss\), aux_data\); got a tuple",
  ):
    bloop_optax.value_and_grads(lambda w: (w.sum(), w.sum(), w.sum()), has_aux=True)(jnp.ones(2))
  with pytest.raises(TypeError, match=r"expected aux_loss_2 to be a scalar; got shape \(2,\)"):
    bloop_optax.value_and_grads(lambda w: (w.sum(), w.sum(), w))(jnp.ones(2))
  with pytest.raises(TypeError, match=r"argnums=3 needs positional argument 3; got 1"):
    bloop_optax.value_and_grads(lambda w: (w, w), argnums=3)(1.0)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_forgetting_has_aux_names_it(jit):
  """A Flax-tutorial loss, ((main, aux), logits), without has_aux=True."""

  def loss_fn(w):
    logits = w * 2.0
    return (jnp.sum(logits**2), jnp.sum(w)), logits

  grad_fn = bloop_optax.value_and_grads(loss_fn)
  with pytest.raises(TypeError, match=r"main_loss to be a scalar; got a tuple.*has_aux=True"):
    (jax.jit(grad_fn) if jit else grad_fn)(jnp.ones(3))
  (main, _), logits = bloop_optax.value_and_grads(loss_fn, has_aux=True)(jnp.ones(3))[0]
  assert float(main) == 12.0 and logits.shape == (3,)


# ---------------------------------------------------------------- Flax NNX


def test_nnx_step_runs_batchnorm_and_dropout_once():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(5, 16, rngs=rngs)
      self.norm = nnx.BatchNorm(16, momentum=0.5, rngs=rngs)
      self.drop = nnx.Dropout(0.2, rngs=rngs)
      self.head = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
      return self.head(self.drop(nnx.relu(self.norm(self.dense(x)))))[:, 0]

  x, y = regression_data()
  model = Net(nnx.Rngs(params=0, dropout=1))
  tx = optax.chain(bloop_optax.bloop(0.1, ema_decay=0.9), optax.adam(1e-2))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def fun(params, rest):
      net = nnx.merge(graphdef, params, rest)
      main = jnp.mean((net(x) - y) ** 2)
      aux = 0.5 * sum(jnp.sum(p**2) for p in jax.tree.leaves(params))
      return (main, aux), nnx.state(net, nnx.Not(nnx.Param))

    ((main, _), rest), grads = bloop_optax.value_and_grads(fun, has_aux=True)(params, rest)
    nnx.update(model, rest)
    optimizer.update(model, grads)
    return main

  # Reference for "forward once": a copy whose BatchNorm sees this batch once.
  twin = nnx.clone(model)
  twin(x)
  count0 = int(model.drop.rngs.count[...])
  first = train_step(model, optimizer, x, y)
  np.testing.assert_allclose(model.norm.mean[...], twin.norm.mean[...], rtol=1e-6)
  np.testing.assert_allclose(model.norm.var[...], twin.norm.var[...], rtol=1e-6)
  assert int(model.drop.rngs.count[...]) == int(twin.drop.rngs.count[...]) == count0 + 1
  for _ in range(60):
    last = train_step(model, optimizer, x, y)
  assert float(last) < 0.5 * float(first)
  ema = optimizer.opt_state[0].main_ema
  shapes = lambda tree: [jnp.shape(leaf) for leaf in jax.tree.leaves(tree)]
  assert shapes(ema) == shapes(nnx.state(model, nnx.Param))
  assert float(bloop_optax.tree_dot(ema, ema)) > 0


def test_nnx_state_pair_is_accepted():
  from flax import nnx

  m = {"w": jnp.array([1.0, 0.0])}
  a = {"w": jnp.array([3.0, 4.0])}
  tx = bloop_optax.bloop(1.0, ema_decay=0.0)
  for pair in (nnx.State({0: m, 1: a}), nnx.State({"main": m, "aux": a})):
    main = pair[0] if 0 in pair.keys() else pair["main"]  # as NNX holds it (a State or a dict)
    d, _ = tx.update(pair, tx.init(main))
    np.testing.assert_allclose(d["w"], [1.0, 4.0])


# ---------------------------------------------------------------- Flax linen


def test_linen_train_state_apply_gradients_with_the_pair():
  import flax.linen as nn
  from flax.training import train_state

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(1)(nn.tanh(nn.Dense(8)(x)))[:, 0]

  x, y = regression_data()
  net = Net()
  params = net.init(jax.random.key(0), x)["params"]
  tx = optax.chain(bloop_optax.bloop(0.5, ema_decay=0.9), optax.adam(1e-2))
  state = train_state.TrainState.create(apply_fn=net.apply, params=params, tx=tx)

  def fun(params):
    main = jnp.mean((net.apply({"params": params}, x) - y) ** 2)
    return main, 0.5 * sum(jnp.sum(p**2) for p in jax.tree.leaves(params))

  @jax.jit
  def train_step(state):
    (main, _), grads = bloop_optax.value_and_grads(fun)(state.params)
    return state.apply_gradients(grads=grads), main

  # One step equals the transform applied by hand to two jax.grad results.
  grads = MainAux(jax.grad(lambda p: fun(p)[0])(params), jax.grad(lambda p: fun(p)[1])(params))
  updates, _ = tx.update(grads, tx.init(params), params)
  state1, first = train_step(state)
  assert_trees_close(state1.params, optax.apply_updates(params, updates))
  state = state1
  for _ in range(100):
    state, last = train_step(state)
  assert float(last) < 0.5 * float(first)


# ---------------------------------------------------------------- accumulation


def test_multi_steps_equals_the_full_batch_step():
  x, y = regression_data(n=64)
  params0 = init_params()
  inner = lambda: optax.chain(bloop_optax.bloop(0.5, ema_decay=0.9), optax.adam(3e-2))
  grad_fn = jax.jit(bloop_optax.value_and_grads(losses))

  full_tx, params_full = inner(), params0
  full_state = full_tx.init(params_full)
  acc_tx, params_acc = bloop_optax.multi_steps(inner(), every_k=4), params0
  acc_state = acc_tx.init(params_acc)
  for _ in range(5):
    _, g = grad_fn(params_full, x, y)
    u, full_state = full_tx.update(g, full_state, params_full)
    params_full = optax.apply_updates(params_full, u)
    for k in range(4):
      sl = slice(16 * k, 16 * (k + 1))
      _, g = grad_fn(params_acc, x[sl], y[sl])
      u, acc_state = jax.jit(acc_tx.update)(g, acc_state, params_acc)
      if k < 3:
        assert all(float(jnp.abs(leaf).max()) == 0 for leaf in jax.tree.leaves(u))
      params_acc = optax.apply_updates(params_acc, u)
  assert int(acc_state.gradient_step) == 5
  assert_trees_close(params_acc, params_full, rtol=1e-4, atol=1e-5)
  assert_trees_close(
    acc_state.inner_state[0].main_ema, full_state[0].main_ema, rtol=1e-4, atol=1e-6
  )


def test_optax_multisteps_around_the_pair_fails_loudly():
  """The wrong pattern raises instead of training on part of the data."""
  params = init_params()
  wrong = optax.MultiSteps(optax.chain(bloop_optax.bloop(), optax.sgd(0.1)), every_k_schedule=2)
  state = wrong.init(params)
  # jax names the pair's type (MainAux) in its tree-structure error; before
  # jax 0.6 the error says "Expected named tuple" instead.
  with pytest.raises(ValueError, match="MainAux|named tuple"):
    wrong.update(MainAux(params, params), state, params)


def test_multi_steps_bad_input():
  with pytest.raises(ValueError, match=r"expected every_k to be an int >= 1; got 0"):
    bloop_optax.multi_steps(optax.sgd(1.0), 0)
  tx = bloop_optax.multi_steps(optax.chain(bloop_optax.bloop(), optax.sgd(1.0)), 2)
  params = init_params()
  with pytest.raises(TypeError, match="multi_steps: expected updates=MainAux"):
    tx.update(params, tx.init(params), params)


# ---------------------------------------------------------------- checkpoints


def _train(tx, params, state, steps, start=0):
  x, y = regression_data(n=64)
  grad_fn = bloop_optax.value_and_grads(losses)

  @jax.jit
  def step(params, state, i):
    sl = jax.lax.dynamic_slice_in_dim
    _, g = grad_fn(params, sl(x, 8 * (i % 8), 8), sl(y, 8 * (i % 8), 8))
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  for i in range(start, start + steps):
    params, state = step(params, state, i)
  return params, state


def test_checkpoint_resume_continues_exactly(tmp_path):
  import orbax.checkpoint as ocp

  tx = optax.chain(bloop_optax.bloop(0.5, ema_decay=0.9), optax.adam(1e-2))
  params0 = init_params()
  straight = _train(tx, params0, tx.init(params0), steps=20)

  half = _train(tx, params0, tx.init(params0), steps=10)
  path = tmp_path / "ckpt"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, {"params": half[0], "opt_state": half[1]})
    ckptr.wait_until_finished()
  # A fresh process would rebuild the templates from init; do the same.
  template = {"params": params0, "opt_state": tx.init(params0)}
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(path, template)
  assert isinstance(restored["opt_state"][0], bloop_optax.BloopState)
  assert_trees_close(restored["opt_state"][0].main_ema, half[1][0].main_ema, 0, 0)
  resumed = _train(tx, restored["params"], restored["opt_state"], steps=10, start=10)
  assert_trees_close(resumed, straight, rtol=0, atol=0)


def test_flax_serialization_roundtrip():
  from flax import serialization

  tx = optax.chain(bloop_optax.bloop(0.5, ema_decay=0.9), optax.adam(1e-2))
  params, state = _train(tx, init_params(), tx.init(init_params()), steps=5)
  data = serialization.to_bytes(state)
  restored = serialization.from_bytes(tx.init(init_params()), data)
  assert_trees_close(restored, state, 0, 0)
  assert int(restored[0].steps) == 5


# ---------------------------------------------------------------- non-finite


def test_nan_batch_mid_training_with_apply_if_finite():
  x, y = regression_data(n=64)
  bad_x = x.at[3, 2].set(jnp.nan)
  tx = optax.chain(
    bloop_optax.bloop(0.5, ema_decay=0.9),
    optax.apply_if_finite(optax.adam(1e-2), max_consecutive_errors=5),
  )
  params = init_params()
  state = tx.init(params)
  grad_fn = bloop_optax.value_and_grads(losses)

  @jax.jit
  def step(params, state, x):
    (main, _), g = grad_fn(params, x, y)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state, main

  history = []
  for i in range(40):
    before = (params, state[0].main_ema)
    params, state, main = step(params, state, bad_x if i == 20 else x)
    if i == 20:
      assert not np.isfinite(float(main))
      assert_trees_close(params, before[0], 0, 0)  # update skipped downstream
      assert_trees_close(state[0].main_ema, before[1], 0, 0)  # EMA untouched
    else:
      history.append(float(main))
  assert int(state[0].skipped_steps) == 1 and int(state[1].total_notfinite) == 1
  assert all(np.isfinite(jax.tree.leaves(state[0].main_ema)[0]).ravel())
  assert history[-1] < history[0] and np.all(np.isfinite(history))


def test_zero_gradients_in_a_loop():
  """All-zero main and aux gradients neither crash nor produce NaNs."""
  params = init_params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  for tx in (
    bloop_optax.bloop(0.5),
    bloop_optax.dynamic_barrier(0.5),
    bloop_optax.pcgrad_pair(0.5),
  ):
    chain = optax.chain(tx, optax.adam(1e-2))
    state = chain.init(params)
    for _ in range(3):
      u, state = jax.jit(chain.update)(MainAux(zeros, zeros), state, params)
      assert all(float(jnp.abs(leaf).max()) == 0 for leaf in jax.tree.leaves(u))
