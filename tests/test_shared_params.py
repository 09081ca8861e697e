"""aggregators.on_shared: the aggregator decides from the shared parameters' K
gradients and applies to them; each task-specific parameter gets the sum of its
gradients (its own task's). Checked against a NumPy reference written from the
definition of TorchJD's ``mtl_backward`` + ``jac_to_grad``, and against the
wrapped aggregator run on the shared subtree alone, for every aggregator."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bloop_optax
from bloop_optax import aggregators as agg
from bloop_optax.aggregators import _catalogue
from tests import reference_mtl as ref
from tests.aggregator_cases import FACTORIES
from tests.aggregator_cases import RULES
from tests.catalogue import AGGREGATOR_OPTIONS
from tests.helpers import enable_x64
from tests.helpers import flat

pytestmark = pytest.mark.usefixtures("strict_dtype_promotion")

MASK = {"trunk": True, "heads": False}


def task_grads(rng, k, dtype=jnp.float32):
  """K gradients of a trunk + K heads model: head j's gradient is zero for every
  task but j (what differentiating task i's loss gives), the trunk's are dense."""
  out = []
  for i in range(k):
    scale = rng.uniform(0.5, 3)
    trunk = {
      "w": scale * rng.standard_normal((6, 4)),
      "b": scale * rng.standard_normal(4),
    }
    heads = [{"w": rng.standard_normal((4, 2)) if j == i else np.zeros((4, 2))} for j in range(k)]
    out.append(jax.tree.map(lambda x: jnp.asarray(x, dtype), {"trunk": trunk, "heads": heads}))
  return tuple(out)


def shared_flags(tree):
  """Per flattened coordinate: whether it belongs to the trunk."""
  marks = {
    "trunk": jax.tree.map(jnp.ones_like, tree["trunk"]),
    "heads": jax.tree.map(jnp.zeros_like, tree["heads"]),
  }
  return flat(marks) > 0.5


def mtl_backward_reference(jac, shared, rule):
  """TorchJD's mtl_backward then jac_to_grad, on the K x P Jacobian: the rule on
  the shared columns, the task-specific columns summed over tasks."""
  out = np.empty(jac.shape[1])
  out[shared] = rule(jac[:, shared])
  out[~shared] = jac[:, ~shared].sum(axis=0)
  return out


def pcgrad_orders(tx, grads, k):
  key = jax.random.split(tx.init(grads[0]).inner.rng_key)[1]
  return np.asarray(jax.vmap(lambda kk: jax.random.permutation(kk, k))(jax.random.split(key, k)))


@pytest.mark.parametrize("name", ["mean", *FACTORIES])
def test_equals_the_mtl_backward_reference_in_float32_and_float64(name):
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.float64, 1e-10)):
    with enable_x64():
      rng = np.random.default_rng(5)
      for k in (3,):
        grads = task_grads(rng, k, dtype)
        inner = agg.mean(k) if name == "mean" else FACTORIES[name](k)
        tx = agg.on_shared(inner, MASK)
        d, state = jax.jit(tx.update)(grads, tx.init(grads[0]))
        jac = np.stack([flat(g) for g in grads])
        shared = shared_flags(grads[0])
        if name == "pcgrad":
          orders = pcgrad_orders(tx, grads, k)
          rule = lambda j, o=orders: ref.pcgrad(j, o)  # noqa: E731
        else:
          rule = RULES[name][1]
        want = mtl_backward_reference(jac, shared, rule)
        got = flat(d)
        assert np.abs(got - want).max() <= tol * np.abs(want).max(), (name, k, dtype)
        assert jax.tree.structure(d) == jax.tree.structure(grads[0])
        assert all(x.dtype == dtype for x in jax.tree.leaves(d))
        if name == "mean":  # mean keeps no state
          continue
        # the weights were decided from the trunk's Gram matrix alone
        np.testing.assert_allclose(
          np.asarray(state.inner.objective_weights, np.float64) @ jac[:, shared],
          got[shared],
          rtol=1e-5,
          atol=1e-5 * np.abs(got).max(),
        )


@pytest.mark.parametrize("name", ["mean", "upgrad"])
def test_an_array_many_gradients_share_counts_once_per_gradient(name):
  """An array that several of the K gradients hold (the same object: the zeros
  value_and_grads gives the tasks that do not read a head, when the step is
  traced as a whole, here eagerly; here also one trunk leaf four tasks share) is
  read once with the sum of its coefficients: the direction equals the
  reference's, in float32 and float64."""
  k = 6
  for dtype, tol in ((jnp.float32, 1e-5), (jnp.float64, 1e-10)):
    with enable_x64():
      rng = np.random.default_rng(8)
      grads = task_grads(rng, k, dtype)
      zeros = [{"w": jnp.zeros((4, 2), dtype)} for _ in range(k)]
      common = grads[0]["trunk"]["b"]
      grads = tuple(
        {
          "trunk": {"w": g["trunk"]["w"], "b": common if i < 4 else g["trunk"]["b"]},
          "heads": [h if j == i else zeros[j] for j, h in enumerate(g["heads"])],
        }
        for i, g in enumerate(grads)
      )
      inner = agg.mean(k) if name == "mean" else FACTORIES[name](k)
      tx = agg.on_shared(inner, MASK)
      d, _ = tx.update(grads, tx.init(grads[0]))
      jac = np.stack([flat(g) for g in grads])
      want = mtl_backward_reference(jac, shared_flags(grads[0]), RULES[name][1])
      assert np.abs(flat(d) - want).max() <= tol * np.abs(want).max(), (name, dtype)


@pytest.mark.parametrize("name", ["upgrad", "mgda", "nash_mtl", "config"])
def test_ema_weights_come_from_the_shared_emas(name):
  """With ema_decay the EMAs cover the shared parameters only; the weights are
  decided from their Gram matrix and applied to the current shared gradients."""
  k, beta = 3, 0.8
  rng = np.random.default_rng(11)
  tx = agg.on_shared(FACTORIES[name](k, ema_decay=beta), MASK)
  state = tx.init(task_grads(rng, k)[0])
  assert jax.tree.leaves(state.inner.grad_emas[0]) and all(
    x.shape in ((6, 4), (4,)) for x in jax.tree.leaves(state.inner.grad_emas)
  )
  update = jax.jit(tx.update)
  shared = shared_flags(task_grads(rng, k)[0])
  emas = np.zeros((k, int(shared.sum())))
  for _ in range(8):
    grads = task_grads(rng, k)
    d, state = update(grads, state)
    jac = np.stack([flat(g) for g in grads])
    emas = beta * emas + (1 - beta) * jac[:, shared]
    weights, *_ = np.linalg.lstsq(emas.T, RULES[name][1](emas), rcond=None)
    want = mtl_backward_reference(jac, shared, lambda j, w=weights: w @ j)
    assert np.abs(flat(d) - want).max() <= 2e-5 * np.abs(want).max(), name
  np.testing.assert_allclose(
    np.stack([flat(e) for e in state.inner.grad_emas]), emas, rtol=1e-5, atol=1e-6
  )


def _shared_of(tree):
  return tree["trunk"]


@pytest.mark.parametrize("entry", _catalogue.ENTRIES, ids=lambda e: e.name)
def test_every_aggregator_is_its_own_direction_on_the_shared_subtree(entry):
  """Any aggregator wrapped: on the trunk, exactly what it gives when handed the
  trunk's gradients alone (with its state carried over steps); on the heads,
  each head's own gradient."""
  k = 3
  options = dict(AGGREGATOR_OPTIONS.get(entry.name, {}))
  if entry.ema == "required":
    options.setdefault("ema_decay", 0.9)
  rng = np.random.default_rng(2)
  wrapped = agg.on_shared(entry.make(k, **options), MASK)
  alone = entry.make(k, **options)
  first = task_grads(rng, k)
  w_state, a_state = wrapped.init(first[0]), alone.init(_shared_of(first[0]))
  for _ in range(2):
    grads = task_grads(rng, k)
    d, w_state = jax.jit(wrapped.update)(grads, w_state)
    want, a_state = jax.jit(alone.update)(tuple(_shared_of(g) for g in grads), a_state)
    np.testing.assert_allclose(flat(d["trunk"]), flat(want), rtol=1e-6, atol=1e-7)
    for j, head in enumerate(d["heads"]):
      np.testing.assert_array_equal(head["w"], grads[j]["heads"][j]["w"])
  if entry.name != "mean":  # mean keeps no state
    np.testing.assert_allclose(
      w_state.inner.objective_weights, a_state.objective_weights, rtol=1e-6
    )


def test_differs_from_aggregating_every_parameter():
  """The semantics matter: UPGrad on the full gradients (heads included) moves
  the trunk differently and scales each head by its weight."""
  rng = np.random.default_rng(4)
  grads = task_grads(rng, 4)
  full, shared = agg.upgrad(4), agg.on_shared(agg.upgrad(4), MASK)
  d_full, _ = full.update(grads, full.init(grads[0]))
  d_shared, _ = shared.update(grads, shared.init(grads[0]))
  gap = np.abs(flat(d_full["trunk"]) - flat(d_shared["trunk"])).max()
  assert gap > 1e-3 * np.abs(flat(d_shared["trunk"])).max()


def test_mask_forms_callable_prefix_and_full_agree():
  rng = np.random.default_rng(0)
  grads = task_grads(rng, 2)
  full_mask = jax.tree.map(lambda _: True, grads[0]) | {
    "heads": jax.tree.map(lambda _: False, grads[0]["heads"])
  }
  outs = []
  for shared in (MASK, full_mask, lambda tree: {"trunk": True, "heads": False}):
    tx = agg.on_shared(agg.mgda(2), shared)
    outs.append(flat(tx.update(grads, tx.init(grads[0]))[0]))
  np.testing.assert_array_equal(outs[0], outs[1])
  np.testing.assert_array_equal(outs[0], outs[2])


@pytest.mark.optax_optimizer
def test_chain_with_value_and_grads_trains_a_trunk_and_heads():
  """A jitted step: value_and_grads of K losses, on_shared(upgrad), adam; each
  task's loss falls."""
  k = 3
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((64, 5)), jnp.float32)
  targets = jnp.asarray(x @ rng.standard_normal((5, k)), jnp.float32)
  params = {
    "trunk": jnp.asarray(0.3 * rng.standard_normal((5, 8)), jnp.float32),
    "heads": [jnp.asarray(0.3 * rng.standard_normal(8), jnp.float32) for _ in range(k)],
  }

  def losses(p):
    f = jnp.tanh(x @ p["trunk"])
    return tuple(jnp.mean((f @ p["heads"][i] - targets[:, i]) ** 2) for i in range(k))

  tx = optax.chain(agg.on_shared(agg.upgrad(k), MASK), optax.adam(1e-2))
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    values, grads = bloop_optax.value_and_grads(losses)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, jnp.stack(values)

  first = None
  for _ in range(300):
    params, state, values = step(params, state)
    first = values if first is None else first
  assert np.all(np.asarray(values) < 0.5 * np.asarray(first))


def test_nonfinite_gradients():
  """A NaN in a head's gradient shows in that head's direction only; one in a
  shared gradient makes the shared direction NaN and the inner aggregator skips
  the step (its EMAs untouched), as it does alone."""
  rng = np.random.default_rng(0)
  tx = agg.on_shared(agg.upgrad(2, ema_decay=0.9), MASK)
  grads = task_grads(rng, 2)
  state = tx.init(grads[0])
  _, state = tx.update(grads, state)
  head_nan = task_grads(rng, 2)
  head_nan[1]["heads"][1]["w"] = head_nan[1]["heads"][1]["w"].at[0, 0].set(jnp.nan)
  d, after = tx.update(head_nan, state)
  assert np.all(np.isfinite(flat(d["trunk"]))) and np.all(np.isfinite(d["heads"][0]["w"]))
  assert np.isnan(d["heads"][1]["w"][0, 0]) and int(after.inner.skipped_steps) == 0
  trunk_nan = task_grads(rng, 2)
  trunk_nan[0]["trunk"]["b"] = trunk_nan[0]["trunk"]["b"].at[1].set(jnp.inf)
  d, after = tx.update(trunk_nan, state)
  assert np.all(np.isnan(flat(d["trunk"]))) and int(after.inner.skipped_steps) == 1
  emas = (after.inner.grad_emas, state.inner.grad_emas)
  for e, e0 in zip(*map(jax.tree.leaves, emas), strict=True):
    np.testing.assert_array_equal(e, e0)
  np.testing.assert_array_equal(d["heads"][0]["w"], trunk_nan[0]["heads"][0]["w"])


@pytest.mark.parametrize(
  ("shared", "error", "match"),
  [
    ({"trunk": True}, ValueError, "structure of the parameters"),
    ({"trunk": False, "heads": False}, ValueError, "selects none"),
    ({"trunk": jnp.array(True), "heads": False}, TypeError, r"Python bool in shared at \['tr"),
  ],
)
def test_bad_masks_raise_with_the_path(shared, error, match):
  grads = task_grads(np.random.default_rng(0), 2)
  tx = agg.on_shared(agg.upgrad(2), shared)
  with pytest.raises(error, match=match):
    tx.init(grads[0])


def test_a_non_transform_raises():
  with pytest.raises(TypeError, match="expected inner to be an aggregator"):
    agg.on_shared(agg.upgrad_weights, MASK)


# ------------------------------------------------------------- frameworks


def _shared_by_path(name):
  """A mask function marking the subtree whose first path key is ``name``."""

  def first_key(path):
    key = path[0]
    return getattr(key, "key", getattr(key, "name", None))

  return lambda g: jax.tree_util.tree_map_with_path(lambda path, _: first_key(path) == name, g)


@pytest.mark.optax_optimizer
def test_nnx_trunk_filter_with_the_sum_is_nnx_own_step():
  """Flax NNX: on_shared(constant(K, ones)) with the docs' path mask is the gradient
  of the summed losses, so the step equals nnx.value_and_grad's, state included."""
  nnx = pytest.importorskip("flax.nnx")
  k = 3

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.trunk = nnx.Linear(4, 8, rngs=rngs)
      heads = [nnx.Linear(8, 1, rngs=rngs) for _ in range(k)]
      self.heads = nnx.List(heads) if hasattr(nnx, "List") else heads  # flax >= 0.12: nnx.List

    def __call__(self, x):
      h = jnp.tanh(self.trunk(x))
      return [head(h)[:, 0] for head in self.heads]

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((16, k)), jnp.float32)

  def losses(model):
    return tuple(jnp.mean((out - y[:, i]) ** 2) for i, out in enumerate(model(x)))

  ones = agg.constant(k, (1.0,) * k)
  ours, theirs = Net(nnx.Rngs(0)), Net(nnx.Rngs(0))
  tx = optax.chain(agg.on_shared(ones, _shared_by_path("trunk")), optax.sgd(0.05))
  optimizer = nnx.Optimizer(ours, tx, wrt=nnx.Param)
  own = nnx.Optimizer(theirs, optax.sgd(0.05), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    _, grads = bloop_optax.value_and_grads(losses)(model)
    optimizer.update(model, grads)

  @nnx.jit
  def own_step(model, optimizer):
    _, grads = nnx.value_and_grad(lambda m: sum(losses(m)))(model)
    optimizer.update(model, grads)

  for _ in range(3):
    step(ours, optimizer)
    own_step(theirs, own)
  states = (nnx.state(ours), nnx.state(theirs))
  for a, b in zip(*map(jax.tree.leaves, states), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  weights = optax.tree.get(nnx.state(optimizer), "objective_weights")
  np.testing.assert_array_equal(np.asarray(weights), np.ones(k))


@pytest.mark.optax_optimizer
def test_equinox_trunk_field_with_the_sum_is_equinox_own_step():
  eqx = pytest.importorskip("equinox")
  k = 3

  class Net(eqx.Module):
    trunk: eqx.nn.Linear
    heads: list

    def __init__(self, key):
      keys = jax.random.split(key, k + 1)
      self.trunk = eqx.nn.Linear(4, 8, key=keys[0])
      self.heads = [eqx.nn.Linear(8, 1, key=kk) for kk in keys[1:]]

  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((16, k)), jnp.float32)

  def losses(model):
    h = jax.vmap(lambda v: jnp.tanh(model.trunk(v)))(x)
    return tuple(
      jnp.mean((jax.vmap(head)(h)[:, 0] - y[:, i]) ** 2) for i, head in enumerate(model.heads)
    )

  model = Net(jax.random.key(0))
  params = eqx.filter(model, eqx.is_inexact_array)
  tx = optax.chain(
    agg.on_shared(agg.constant(k, (1.0,) * k), _shared_by_path("trunk")), optax.sgd(0.05)
  )
  sgd = optax.sgd(0.05)
  state, own_state, twin = tx.init(params), sgd.init(params), model

  @eqx.filter_jit
  def step(model, state):
    _, grads = bloop_optax.value_and_grads(losses)(model)
    updates, state = tx.update(grads, state, eqx.filter(model, eqx.is_inexact_array))
    return eqx.apply_updates(model, updates), state

  @eqx.filter_jit
  def own_step(model, state):
    grads = eqx.filter_grad(lambda m: sum(losses(m)))(model)
    updates, state = sgd.update(grads, state)
    return eqx.apply_updates(model, updates), state

  for _ in range(3):
    model, state = step(model, state)
    twin, own_state = own_step(twin, own_state)
  for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(twin), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------ the features Jacobian (MGDA-UB)


def _features_step(tx, trunk_params, heads, x, y):
  """The docs' recipe: the aggregator decides from the K gradients of the trunk's
  output (the shared features) and its direction there is pulled back through
  one backward pass of the trunk; each head gets its own task's gradient."""

  def trunk(p):
    return jnp.tanh(x @ p["w"] + p["b"])

  def head_losses(f):
    return tuple(
      0.5 * jnp.mean(jnp.sum((f["features"] @ h["w"] - y[i]) ** 2, axis=1))
      for i, h in enumerate(f["heads"])
    )

  features, pullback = jax.vjp(trunk, trunk_params)
  _, grads = bloop_optax.value_and_grads(head_losses)({"features": features, "heads": heads})
  direction, _ = tx.update(grads, tx.init({"features": features, "heads": heads}))
  (trunk_direction,) = pullback(direction["features"])
  return {"trunk": trunk_direction, "heads": direction["heads"]}


def _features_reference(rule, w, b, heads, x, y):
  """MGDA-UB written out in NumPy: z = tanh(x W + b); task i's gradient with
  respect to z is (z H_i - y_i) H_i^T / B; the rule's direction over those K
  gradients is pulled back through tanh and the affine map; head i's gradient
  is z^T (z H_i - y_i) / B."""
  n = x.shape[0]
  z = np.tanh(x @ w + b)
  feature_grads = np.stack([((z @ h - t) @ h.T / n).ravel() for h, t in zip(heads, y, strict=True)])
  dz = rule(feature_grads).reshape(z.shape) * (1 - z**2)
  head_grads = [z.T @ (z @ h - t) / n for h, t in zip(heads, y, strict=True)]
  return {"trunk": {"b": dz.sum(0), "w": x.T @ dz}, "heads": [{"w": g} for g in head_grads]}


@pytest.mark.parametrize("name", ["mean", "mgda", "upgrad", "config", "nash_mtl"])
def test_features_recipe_equals_the_mgda_ub_reference_in_float64(name):
  k, n = 3, 16
  with enable_x64():
    rng = np.random.default_rng(3)
    w, b = rng.standard_normal((5, 4)), 0.1 * rng.standard_normal(4)
    # targets of alternating sign: the tasks' gradients conflict
    base = rng.standard_normal((4, 2))
    heads = [base + 0.3 * rng.standard_normal((4, 2)) for _ in range(k)]
    x = rng.standard_normal((n, 5))
    target = 3 * rng.standard_normal((n, 2))
    y = [(-1) ** i * target + rng.standard_normal((n, 2)) for i in range(k)]
    inner = agg.mean(k) if name == "mean" else FACTORIES[name](k)
    tx = agg.on_shared(inner, {"features": True, "heads": False})
    got = jax.jit(_features_step, static_argnums=0)(
      tx,
      {"w": jnp.asarray(w), "b": jnp.asarray(b)},
      [{"w": jnp.asarray(h)} for h in heads],
      jnp.asarray(x),
      [jnp.asarray(t) for t in y],
    )
    want = _features_reference(RULES[name][1], w, b, heads, x, y)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert all(v.dtype == jnp.float64 for v in jax.tree.leaves(got))
    scale = np.abs(flat(want)).max()
    assert np.abs(flat(got) - flat(want)).max() <= 1e-10 * scale, name
    # It is a different direction from the one decided on the trunk's parameters
    # (unless the rule ignores the Gram matrix, as the mean does).
    params_mode = mtl_backward_reference(
      np.stack([flat(g) for g in _task_param_grads(w, b, heads, x, y)]),
      shared_flags({"trunk": {"b": b, "w": w}, "heads": [{"w": h} for h in heads]}),
      RULES[name][1],
    )
    gap = np.abs(params_mode - flat(want)).max() / scale
    assert (gap < 1e-10) == (name == "mean"), (name, gap)


def _task_param_grads(w, b, heads, x, y):
  """Each task's full-parameter gradient (trunk and every head), in NumPy."""
  n = x.shape[0]
  z = np.tanh(x @ w + b)
  out = []
  for i, (h, t) in enumerate(zip(heads, y, strict=True)):
    r = (z @ h - t) / n
    dz = (r @ h.T) * (1 - z**2)
    head_grads = [{"w": z.T @ r if j == i else np.zeros_like(h)} for j in range(len(heads))]
    out.append({"trunk": {"b": dz.sum(0), "w": x.T @ dz}, "heads": head_grads})
  return out
