"""The multi-objective aggregators against a NumPy reference written from each
method's paper, their degenerate cases, the EMA option and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bloop_optax
from bloop_optax import _aggregators as agg_impl
from bloop_optax import _qp
from bloop_optax import aggregators as agg
from tests import reference_mtl as ref
from tests.test_transforms import enable_x64
from tests.test_transforms import flat
from tests.test_transforms import random_tree


@pytest.fixture(autouse=True)
def strict_dtype_promotion(request):
  mode = "standard" if request.node.get_closest_marker("optax_optimizer") else "strict"
  with jax.numpy_dtype_promotion(mode):
    yield


# name -> (weights rule on a Gram matrix, reference on J); PCGrad takes orders.
RULES = {
  "mean": (agg.mean_weights, ref.mean),
  "mgda": (agg.mgda_weights, ref.mgda),
  "imtl_g": (agg.imtl_g_weights, ref.imtl_g),
  "aligned_mtl": (agg.aligned_mtl_weights, ref.aligned_mtl),
  "upgrad": (agg.upgrad_weights, ref.upgrad),
  "cagrad": (lambda g: agg.cagrad_weights(g, 0.5), lambda j: ref.cagrad(j, 0.5)),
  "dualproj": (agg.dualproj_weights, ref.dualproj),
  "config": (agg.config_weights, ref.config),
  "nash_mtl": (lambda g: agg.nash_mtl_weights(g, None), ref.nash_mtl),
  "fairgrad": (lambda g: agg.fairgrad_weights(g, 2.0), lambda j: ref.fairgrad(j, 2.0)),
}
FACTORIES = {
  "mgda": agg.mgda,
  "pcgrad": agg.pcgrad,
  "cagrad": agg.cagrad,
  "imtl_g": agg.imtl_g,
  "aligned_mtl": agg.aligned_mtl,
  "upgrad": agg.upgrad,
  "dualproj": agg.dualproj,
  "config": agg.config,
  "nash_mtl": lambda k, **kw: agg.nash_mtl(k, None, **kw),
  "fairgrad": lambda k, **kw: agg.fairgrad(k, 2.0, **kw),
}


def random_jacobians(seed, count=12):
  """Random K x P Jacobians, K = 1..5, P = 3 or 8 (so some K > P), rows of
  very different norms, some with conflicting and some with repeated rows."""
  rng = np.random.default_rng(seed)
  out = []
  for trial in range(count):
    k = 1 + trial % 5
    p = 8 if trial % 3 else 3
    jac = rng.standard_normal((k, p)) * rng.uniform(0.1, 10, size=(k, 1))
    if trial % 4 == 1 and k > 1:
      jac[1] = -0.3 * jac[0] + 0.5 * rng.standard_normal(p)  # strong conflict
    out.append(jac)
  return out


def direction_error(weights, jac, want):
  return np.abs(np.asarray(weights, np.float64) @ jac - want).max() / np.abs(jac).max()


# ------------------------------------------------------------- exactness


@pytest.mark.parametrize("name", list(RULES))
def test_rules_equal_the_reference_in_float64(name):
  rule, reference = RULES[name]
  with enable_x64():
    for jac in random_jacobians(0):
      if name == "imtl_g" and np.linalg.matrix_rank(jac) < len(jac):
        continue  # the paper's closed form needs independent rows; see below
      weights = jax.jit(rule)(jnp.asarray(jac @ jac.T))
      assert direction_error(weights, jac, reference(jac)) < 1e-10, jac.shape


def test_pcgrad_rule_equals_the_reference_for_given_orders():
  rng = np.random.default_rng(1)
  with enable_x64():
    for jac in random_jacobians(1):
      k = len(jac)
      orders = np.stack([rng.permutation(k) for _ in range(k)])
      weights = agg.pcgrad_weights(jnp.asarray(jac @ jac.T), jnp.asarray(orders))
      assert direction_error(weights, jac, ref.pcgrad(jac, orders)) < 1e-10


def test_imtl_g_on_dependent_rows():
  """Dependent rows: the pseudo-inverse form of Quinton and Rey (w = G^+ n /
  sum), written here on J in NumPy; with a repeated row the projections on
  every unit gradient are still equal, as the paper's IMTL-G asks."""
  rng = np.random.default_rng(2)
  with enable_x64():
    for k, p in [(4, 3), (5, 2)]:
      jac = rng.standard_normal((k, p))
      v = np.linalg.pinv(jac @ jac.T) @ np.linalg.norm(jac, axis=1)
      got = np.asarray(agg.imtl_g_weights(jnp.asarray(jac @ jac.T))) @ jac
      np.testing.assert_allclose(got, v / v.sum() @ jac, rtol=1e-10)
    g1, g2 = rng.standard_normal((2, 4))
    jac = np.stack([g1, g2, g1])
    d = np.asarray(agg.imtl_g_weights(jnp.asarray(jac @ jac.T))) @ jac
    projections = jac @ d / np.linalg.norm(jac, axis=1)
    np.testing.assert_allclose(projections, projections[0], rtol=1e-10)
    np.testing.assert_allclose(d, ref.imtl_g(jac[:2]), rtol=1e-10)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_transforms_equal_the_reference_in_float32_on_pytrees(name):
  """The whole transform under jit on a pytree (global inner products), float32,
  against the reference on the flattened float64 gradients: 1e-5 relative."""
  rng = np.random.default_rng(3)
  for k in (2, 4):
    grads = tuple(random_tree(rng, scale=float(s)) for s in rng.uniform(0.5, 3, k))
    jac = np.stack([flat(g) for g in grads])
    tx = FACTORIES[name](k)
    state = tx.init(grads[0])
    d, state = jax.jit(tx.update)(grads, state)
    if name == "pcgrad":
      key = jax.random.split(tx.init(grads[0]).rng_key)[1]
      orders = np.asarray(
        jax.vmap(lambda kk, k=k: jax.random.permutation(kk, k))(jax.random.split(key, k))
      )
      want = ref.pcgrad(jac, orders)
    else:
      want = RULES[name][1](jac)
    got = flat(d)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), (name, k)
    assert jax.tree.structure(d) == jax.tree.structure(grads[0])
    np.testing.assert_allclose(
      np.asarray(state.objective_weights) @ jac, got, rtol=1e-5, atol=1e-5 * np.abs(got).max()
    )


# ---------------------------------------------------------- degenerate cases


@jax.jit
def _pcgrad_in_order(gram):
  k = gram.shape[0]
  return agg.pcgrad_weights(gram, jnp.tile(jnp.arange(k), (k, 1)))


JITTED = {name: jax.jit(rule) for name, (rule, _) in RULES.items()} | {
  "pcgrad": _pcgrad_in_order,
  "cagrad_c": jax.jit(agg.cagrad_weights),
}


def run_rule(name, jac, c=0.5):
  """The direction of a rule on J in float64 (PCGrad in the order 0..K-1)."""
  with enable_x64():
    gram = jnp.asarray(jac @ jac.T)
    if name == "cagrad":
      return np.asarray(JITTED["cagrad_c"](gram, c)) @ jac
    return np.asarray(JITTED[name](gram)) @ jac


G = np.array([3.0, -1.0, 2.0])
ALL = ["mean", "mgda", "pcgrad", "cagrad", "imtl_g", "aligned_mtl", "upgrad", "dualproj", "config"]


@pytest.mark.parametrize("name", ALL)
def test_one_objective(name):
  want = {"cagrad": 1.5 * G}.get(name, G)  # CAGrad: g + c |g| g / |g|
  np.testing.assert_allclose(run_rule(name, G[None]), want, rtol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_identical_gradients(name):
  want = {"pcgrad": 3 * G, "cagrad": 1.5 * G, "config": 3 * G}.get(name, G)
  np.testing.assert_allclose(run_rule(name, np.stack([G, G, G])), want, rtol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_opposite_gradients_give_zero(name):
  d = run_rule(name, np.stack([G, -G]))
  np.testing.assert_allclose(d, 0, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_zero_gradients_give_zero_and_no_nan(name):
  d = run_rule(name, np.zeros((3, 3)))
  np.testing.assert_array_equal(d, 0)


@pytest.mark.parametrize(
  ("name", "want"),
  [
    ("mean", G / 2),
    ("mgda", 0 * G),  # 0 is in the hull
    ("pcgrad", G),
    ("imtl_g", G),  # the pseudo-inverse ignores the zero gradient
    ("aligned_mtl", G / 2),
    ("upgrad", G / 2),
    ("dualproj", G / 2),
    ("config", G),  # a zero gradient has no direction: the other one's
  ],
)
def test_one_zero_gradient(name, want):
  np.testing.assert_allclose(run_rule(name, np.stack([G, 0 * G])), want, atol=1e-12)


@pytest.mark.parametrize(
  ("name", "want"),
  [
    ("mean", 1.5 * G),
    ("mgda", G),  # the shorter one
    ("pcgrad", 3 * G),  # no conflict: the sum
    ("imtl_g", 5 / 3 * G),  # w = (1, 2) / 3 from the pseudo-inverse
    ("aligned_mtl", 1.5 * G),  # rank 1: B J = projection onto the one direction
    ("upgrad", 1.5 * G),
    ("cagrad", 1.5 * G + 0.5 * 1.5 * G),  # hull = [g, 2g]: g_w along g
    ("dualproj", 1.5 * G),
    ("config", 3 * G),  # along g, with length |g| + |2g|
  ],
)
def test_collinear_gradients(name, want):
  np.testing.assert_allclose(run_rule(name, np.stack([G, 2 * G])), want, rtol=1e-12)


def test_two_objectives_closed_forms():
  """K = 2: MGDA's segment formula, UPGrad = PCGrad / 2 under conflict, PCGrad
  equals the package's two-task pcgrad with weight 1, CAGrad's endpoint."""
  rng = np.random.default_rng(4)
  for _ in range(10):
    g1, g2 = rng.standard_normal((2, 5))
    jac = np.stack([g1, g2])
    alpha = np.clip((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0, 1)
    np.testing.assert_allclose(run_rule("mgda", jac), alpha * g1 + (1 - alpha) * g2, atol=1e-12)
    pc = run_rule("pcgrad", jac)
    with enable_x64():
      two_task = bloop_optax.pcgrad(1.0)
      want, _ = two_task.update((jnp.asarray(g1), jnp.asarray(g2)), two_task.init(g1))
    np.testing.assert_allclose(pc, np.asarray(want), atol=1e-12)
    up = run_rule("upgrad", jac)
    np.testing.assert_allclose(up, pc / 2 if g1 @ g2 < 0 else jac.mean(0), atol=1e-12)
  # 0 inside the hull [g, -0.7 g]: y* = -0.7 g, d = g0 - c |g0| g / |g|.
  g0 = 0.15 * G
  np.testing.assert_allclose(
    run_rule("cagrad", np.stack([G, -0.7 * G])),
    g0 - 0.5 * np.linalg.norm(g0) * G / np.linalg.norm(G),
    atol=1e-12,
  )


def test_cagrad_c_zero_is_mean_and_weights_are_scale_invariant():
  jac = np.random.default_rng(5).standard_normal((3, 6))
  np.testing.assert_allclose(run_rule("cagrad", jac, c=0.0), jac.mean(0), rtol=1e-12)
  with enable_x64():
    for name in ["mgda", "imtl_g", "aligned_mtl", "upgrad", "cagrad"]:
      rule = RULES[name][0]
      gram = jnp.asarray(jac @ jac.T)
      np.testing.assert_allclose(rule(gram * 1e12), rule(gram), rtol=1e-9)


def test_active_set_ends_well_within_its_budget():
  """The exact solver's iterations on random problems stay below half the
  fixed budget (so the budget is a safety net, not a truncation)."""
  rng = np.random.default_rng(6)
  solve = jax.jit(_qp.active_set, static_argnames="simplex")
  with enable_x64():
    for k in (2, 4, 8, 12):
      for _ in range(3):
        jac = rng.standard_normal((k, max(2, k // 2 + 1) if rng.random() < 0.5 else 2 * k))
        q = jnp.asarray(jac @ jac.T)
        q = q / jnp.max(jnp.diag(q))
        x0 = jnp.zeros([k]).at[0].set(1)
        _, _, its = solve(q, jnp.zeros([k]), x0, x0 > 0, simplex=True)
        assert int(its) < _qp.ACTIVE_SET_BUDGET(k) // 2, (k, int(its))
        u = jnp.eye(k)[0] / k
        _, _, its = solve(q, q @ u, jnp.zeros([k]), jnp.zeros([k], bool), simplex=False)
        assert int(its) < _qp.ACTIVE_SET_BUDGET(k) // 2, (k, int(its))


# ------------------------------------------------------------------- EMA


def sequence(seed, k, steps):
  """K gradient sequences around fixed means (objectives that conflict), noisy."""
  rng = np.random.default_rng(seed)
  means = [random_tree(rng) for _ in range(k)]
  means[1] = jax.tree.map(lambda a, b: -0.6 * a + 0.4 * b, means[0], means[1])
  return [
    tuple(jax.tree.map(lambda m, n: m + 0.8 * n, mu, random_tree(rng)) for mu in means)
    for _ in range(steps)
  ]


# The EMA path is shared by every rule: three whose rules differ most (random
# orders, the active set, the scale-dependent Newton solve).
@pytest.mark.parametrize("name", ["pcgrad", "upgrad", "nash_mtl"])
def test_zero_decay_equals_no_ema(name):
  seq = sequence(7, 3, 4)
  a, b = FACTORIES[name](3), FACTORIES[name](3, ema_decay=0.0)
  sa, sb = a.init(seq[0][0]), b.init(seq[0][0])
  for grads in seq:
    da, sa = jax.jit(a.update)(grads, sa)
    db, sb = jax.jit(b.update)(grads, sb)
    np.testing.assert_allclose(flat(da), flat(db), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
  "name",
  [
    "mgda",
    "upgrad",
    "cagrad",
    "aligned_mtl",
    "imtl_g",
    "dualproj",
    "config",
    "nash_mtl",
    "fairgrad",
  ],
)
def test_ema_weights_come_from_the_emas_and_apply_to_the_batch(name):
  """The reference keeps float64 EMAs, decides the weights on them (weights =
  least-squares coefficients of the reference direction on the EMAs, unique
  for independent EMAs) and applies them to the current gradients."""
  k, beta = 3, 0.8
  seq = sequence(8, k, 12)
  tx = FACTORIES[name](k, ema_decay=beta)
  state = tx.init(seq[0][0])
  update = jax.jit(tx.update)
  emas = np.zeros((k, flat(seq[0][0]).size))
  for grads in seq:
    d, state = update(grads, state)
    jac = np.stack([flat(g) for g in grads])
    emas = beta * emas + (1 - beta) * jac
    weights, *_ = np.linalg.lstsq(emas.T, RULES[name][1](emas), rcond=None)
    want = weights @ jac
    assert np.abs(flat(d) - want).max() <= 2e-5 * np.abs(want).max(), name
  np.testing.assert_allclose(
    np.stack([flat(e) for e in state.grad_emas]), emas, rtol=1e-5, atol=1e-6
  )
  norms = np.linalg.norm(emas, axis=1)
  np.testing.assert_allclose(state.gram_cosines, emas @ emas.T / np.outer(norms, norms), atol=1e-5)


def test_nonfinite_step_is_skipped_and_passed_through():
  seq = sequence(9, 3, 3)
  tx = agg.upgrad(3, ema_decay=0.9)
  state = tx.init(seq[0][0])
  update = jax.jit(tx.update)
  _, state = update(seq[0], state)
  before = [flat(e) for e in state.grad_emas]
  bad = (
    seq[1][0],
    jax.tree.map(lambda x: x.at[...].set(jnp.nan) if x.ndim == 0 else x, seq[1][1]),
    seq[1][2],
  )
  d, state = update(bad, state)
  assert not np.all(np.isfinite(flat(d)))
  assert int(state.skipped_steps) == 1 and np.all(np.isnan(state.objective_weights))
  for e, b in zip(state.grad_emas, before, strict=True):
    np.testing.assert_array_equal(flat(e), b)
  d, state = update(seq[2], state)
  assert np.all(np.isfinite(flat(d))) and int(state.skipped_steps) == 1


@pytest.mark.parametrize("name", list(FACTORIES))
def test_huge_gradients_give_the_exact_direction(name):
  """Float32 sums of squares overflow; the direction must still be the formula's.
  FairGrad's weights scale as |g|^(-4/3) at alpha = 2, below float32's range at
  1e30 (its direction is not): it is checked at 1e19, where squares overflow."""
  norm = 1e19 if name == "fairgrad" else 1e30
  rng = np.random.default_rng(10)
  grads = tuple(random_tree(rng, scale=float(norm) * s) for s in (1.0, 0.3, 2.0))
  jac = np.stack([flat(g) for g in grads])
  tx = FACTORIES[name](3)
  d, state = jax.jit(tx.update)(grads, tx.init(grads[0]))
  if name == "pcgrad":
    key = jax.random.split(tx.init(grads[0]).rng_key)[1]
    orders = np.asarray(
      jax.vmap(lambda kk: jax.random.permutation(kk, 3))(jax.random.split(key, 3))
    )
    want = ref.pcgrad(jac, orders)
  else:
    want = RULES[name][1](jac)
  assert np.all(np.isfinite(flat(d))) and int(state.skipped_steps) == 0
  assert np.linalg.norm(flat(d) - want) <= 1e-4 * np.linalg.norm(want), name


# ------------------------------------------------------ randomness, chains


def test_pcgrad_orders_follow_the_key():
  seq = sequence(11, 4, 3)

  def run(key):
    tx = agg.pcgrad(4, key=key)
    state, out = tx.init(seq[0][0]), []
    for grads in seq:
      d, state = jax.jit(tx.update)(grads, state)
      out.append(flat(d))
    return np.stack(out)

  first = run(0)
  np.testing.assert_array_equal(run(jax.random.PRNGKey(0)), first)
  assert not np.allclose(run(1), first)  # the orders matter for K = 4


@pytest.mark.optax_optimizer
def test_chain_with_adam_and_value_and_grads_of_three_losses():
  w0 = {"a": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}
  targets = [jnp.array([2.0, 0.0]), jnp.array([-1.0, 1.0]), jnp.array([0.0, 3.0])]

  def losses(w):
    pred = w["a"] * w["b"]
    return tuple(jnp.sum((pred - t) ** 2) for t in targets)

  # Three rules whose code differs most (the active set, random orders, Newton
  # steps); every rule's transform meets optax's contract in tests/test_contract.py.
  for name in ("upgrad", "pcgrad", "nash_mtl"):
    tx = optax.chain(FACTORIES[name](3, ema_decay=0.9), optax.adam(1e-2))
    state = tx.init(w0)

    @jax.jit
    def step(w, state):
      _, grads = bloop_optax.value_and_grads(losses)(w)
      d, state = tx.update(grads, state, w)  # noqa: B023 (jitted and run in this iteration)
      return optax.apply_updates(w, d), state

    w = w0
    for _ in range(3):
      w, state = step(w, state)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(w)), name
    # The direction handed to adam is the weights applied to the gradients.
    weights = optax.tree.get(state, "objective_weights")
    assert weights.shape == (3,)


def test_mapping_keyed_like_nnx_and_bfloat16():
  rng = np.random.default_rng(12)
  grads = tuple(random_tree(rng, jnp.bfloat16) for _ in range(3))
  tx = agg.mgda(3, ema_decay=0.5)
  state = tx.init(grads[0])
  d1, _ = tx.update(grads, state)
  d2, _ = tx.update({0: grads[0], 1: grads[1], 2: grads[2]}, state)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(d1))
  assert all(e.dtype == jnp.float32 for e in jax.tree.leaves(state.grad_emas))
  np.testing.assert_array_equal(flat(d1), flat(d2))


def test_mean_is_the_average_and_keeps_no_state():
  rng = np.random.default_rng(13)
  grads = tuple(random_tree(rng) for _ in range(3))
  tx = agg.mean(3)
  d, state = jax.jit(tx.update)(grads, tx.init(grads[0]))
  np.testing.assert_allclose(
    flat(d), np.mean([flat(g) for g in grads], axis=0), rtol=1e-5, atol=1e-7
  )
  assert state == optax.EmptyState()


# ------------------------------------------------------------- bad input


@pytest.mark.parametrize(
  ("bad", "error"),
  [(0, ValueError), (-1, ValueError), (2.0, TypeError), ("3", TypeError), (None, TypeError)],
)
def test_bad_num_objectives_raises(bad, error):
  with pytest.raises(error, match="num_objectives"):
    agg.mgda(bad)


def test_wrong_number_of_gradients_raises():
  g = {"w": jnp.ones(2)}
  tx = agg.upgrad(3)
  with pytest.raises(TypeError, match=r"tuple of 3 pytrees.*got a tuple of length 2"):
    tx.update((g, g), tx.init(g))


def test_mismatched_gradients_raise_with_key_path():
  g = {"w": jnp.ones(2)}
  tx = agg.cagrad(2)
  with pytest.raises(ValueError, match=r"grads_0 and grads_1.*\['w'\]"):
    tx.update((g, {"w": jnp.ones(3)}), tx.init(g))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_bad_ema_decay_raises(name):
  with pytest.raises(ValueError, match="ema_decay"):
    FACTORIES[name](2, ema_decay=1.5)


def test_bad_cagrad_c_and_pcgrad_key_raise():
  with pytest.raises(ValueError, match="c to be a finite number >= 0"):
    agg.cagrad(2, c=-0.1)
  with pytest.raises(TypeError, match="key"):
    agg.pcgrad(2, key=None)


def test_gradients_not_matching_init_params_raise():
  tx = agg.mgda(2, ema_decay=0.9)
  state = tx.init({"w": jnp.ones(2)})
  g = {"v": jnp.ones(2)}
  with pytest.raises(ValueError, match="params given to init"):
    tx.update((g, g), state)


# ------------------------------------------------------ many objectives


def weights_on_exact_gram(name, jac, k):
  """The float32 rule's weights on the exact (float64) Gram matrix of J rounded
  once to float32 (PCGrad: with its orders): what the transform must give if
  its Gram matrix is exact."""
  gram = jnp.asarray((jac @ jac.T).astype(np.float32))
  if name == "pcgrad":
    key = jax.random.split(agg.pcgrad(k).init(jnp.zeros(1)).rng_key)[1]
    orders = jax.vmap(lambda kk: jax.random.permutation(kk, k))(jax.random.split(key, k))
    return np.asarray(jax.jit(agg.pcgrad_weights)(gram, orders), np.float64)
  return np.asarray(JITTED[name](gram), np.float64)


@pytest.mark.parametrize("stacked", [False, True], ids=["pairwise", "stacked"])
@pytest.mark.parametrize("scale", [1.0, 1e30])
def test_dense_gram_equals_the_exact_gram_at_any_scale(scale, stacked, monkeypatch):
  """From DENSE_GRAM_FROM objectives on, the Gram matrix is one stacked product
  per leaf: equal to the float64 Gram matrix, also where float32 sums overflow,
  and NaN inputs are told apart from overflow."""
  k = bloop_optax._aggregators.DENSE_GRAM_FROM + 3
  if stacked:  # the ordinary path as for very many objectives or leaves
    monkeypatch.setattr(bloop_optax._tree_math, "MAX_PAIRWISE_REDUCTIONS", 0)
  rng = np.random.default_rng(11)
  trees = tuple(random_tree(rng, scale=scale * float(s)) for s in rng.uniform(0.1, 3, k))
  jac = np.stack([flat(t) for t in trees])
  dots = jax.jit(bloop_optax._tree_math.gram)(trees)
  exps = np.asarray(dots.exps, np.float64)
  got = np.asarray(dots.values, np.float64) * 2.0 ** (exps[:, None] + exps[None, :])
  want = jac @ jac.T
  assert bool(dots.finite)
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
  if scale > 1:
    assert exps.max() > 0  # the slow branch ran
  bad = (jax.tree.map(lambda x: x.at[...].set(jnp.nan), trees[0]),) + trees[1:]
  assert not bool(jax.jit(bloop_optax._tree_math.gram)(bad).finite)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_many_objectives_give_the_exact_direction(name):
  """K = 12 (the stacked Gram path): the transform under jit equals the rule
  applied to the exact Gram matrix (1e-4 relative)."""
  k = 12
  rng = np.random.default_rng(12)
  grads = tuple(random_tree(rng, scale=float(s)) for s in rng.uniform(0.5, 3, k))
  jac = np.stack([flat(g) for g in grads])
  tx = FACTORIES[name](k)
  d, state = jax.jit(tx.update)(grads, tx.init(grads[0]))
  want = weights_on_exact_gram(name, jac, k) @ jac
  got = flat(d)
  assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), name
  assert int(state.skipped_steps) == 0


# ------------------------------------------ DualProj, ConFIG, Krum, Random, Constant


def test_dualproj_never_conflicts_and_is_the_mean_without_conflict():
  with enable_x64():
    for jac in random_jacobians(5):
      d = np.asarray(jax.jit(agg.dualproj_weights)(jnp.asarray(jac @ jac.T))) @ jac
      assert np.all(jac @ d >= -1e-10 * np.abs(jac).max() ** 2), jac.shape
      if np.all(jac @ jac.mean(0) >= 0):
        np.testing.assert_allclose(d, jac.mean(0), atol=1e-12 * np.abs(jac).max())


def test_config_has_equal_positive_cosines_with_independent_gradients():
  rng = np.random.default_rng(6)
  with enable_x64():
    for k, p in [(2, 5), (3, 3), (4, 9)]:
      jac = rng.standard_normal((k, p)) * rng.uniform(0.1, 10, size=(k, 1))
      jac[1] = -0.8 * jac[0] + 0.2 * jac[1]  # a strong conflict
      d = np.asarray(JITTED["config"](jnp.asarray(jac @ jac.T))) @ jac
      cosines = jac @ d / np.linalg.norm(jac, axis=1) / np.linalg.norm(d)
      np.testing.assert_allclose(cosines, cosines[0], rtol=1e-10)
      assert cosines[0] > 0


@pytest.mark.parametrize(
  "rule",
  [agg.dualproj_weights, agg.config_weights, lambda g: agg.krum_weights(g, 1, 2)],
  ids=["dualproj", "config", "krum"],
)
def test_new_rules_are_permutation_equivariant_and_scale_invariant(rule):
  rng = np.random.default_rng(7)
  rule = jax.jit(rule)
  with enable_x64():
    for _ in range(5):
      jac = rng.standard_normal((5, 4)) * rng.uniform(0.1, 10, size=(5, 1))
      perm = rng.permutation(5)
      gram = jnp.asarray(jac @ jac.T)
      w = np.asarray(rule(gram))
      np.testing.assert_allclose(np.asarray(rule(gram[perm][:, perm])), w[perm], atol=1e-12)
      np.testing.assert_allclose(np.asarray(rule(1e6 * gram)), w, rtol=1e-10, atol=1e-12)


def test_krum_equals_the_reference_and_drops_the_outliers():
  rng = np.random.default_rng(8)
  with enable_x64():
    for k, f, m in [(3, 0, 1), (5, 1, 2), (6, 2, 3), (7, 2, 1)]:
      jac = rng.standard_normal((k, 6))
      weights = jax.jit(agg.krum_weights, static_argnums=(1, 2))(jnp.asarray(jac @ jac.T), f, m)
      assert direction_error(weights, jac, ref.krum(jac, f, m)) < 1e-12
    honest = 1.0 + 0.1 * rng.standard_normal((5, 3))
    byzantine = 50 * rng.standard_normal((2, 3))
    jac = np.concatenate([honest, byzantine])
    tx = agg.krum(7, n_byzantine=2, n_selected=3)
    grads = tuple(jnp.asarray(row) for row in jac)
    _, state = tx.update(grads, tx.init(grads[0]))
    assert np.all(np.asarray(state.objective_weights)[5:] == 0)
    np.testing.assert_allclose(np.asarray(state.objective_weights).sum(), 1, rtol=1e-6)


def test_random_weights_are_softmax_of_a_fresh_normal_draw_each_step():
  tx = agg.random(3, key=4)
  g = (jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]), jnp.array([1.0, 1.0]))
  state = tx.init(g[0])
  key = state.rng_key
  seen = []
  for _ in range(3):
    d, state = tx.update(g, state)
    key, sub = jax.random.split(key)
    want = jax.nn.softmax(jax.random.normal(sub, [3]))
    np.testing.assert_allclose(state.objective_weights, want, rtol=1e-6)
    np.testing.assert_allclose(d, want[0] * g[0] + want[1] * g[1] + want[2] * g[2], rtol=1e-6)
    seen.append(np.asarray(state.objective_weights))
  assert not np.allclose(seen[0], seen[1])


def test_constant_weights_and_sum():
  grads = (jnp.array([1.0, 2.0]), jnp.array([-3.0, 0.5]))
  tx = agg.constant(jnp.ones(2))
  d, state = tx.update(grads, tx.init(grads[0]))
  np.testing.assert_allclose(d, grads[0] + grads[1])
  tx = agg.constant([0.25, 2.0])
  d, _ = jax.jit(tx.update)(grads, tx.init(grads[0]))
  np.testing.assert_allclose(d, 0.25 * grads[0] + 2.0 * grads[1])


@pytest.mark.parametrize(
  ("make", "match"),
  [
    (lambda: agg.krum(3, n_byzantine=1), "K >= n_byzantine \\+ 3"),
    (lambda: agg.krum(5, n_selected=6), "n_selected"),
    (lambda: agg.krum(5, n_byzantine=-1), "n_byzantine"),
    (lambda: agg.constant([[1.0, 2.0]]), "1-d sequence"),
    (lambda: agg.constant([1.0, float("nan")]), "finite"),
  ],
)
def test_bad_arguments_of_the_new_rules_raise(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_random_without_a_key_raises():
  with pytest.raises(TypeError, match="PRNG key"):
    agg.random(2, key=None)


# ------------------------------------------------ Nash-MTL, FairGrad, GradVac, CR-MOGM


def test_nash_mtl_and_fairgrad_solve_their_equations_without_the_ridge():
  """With no ridge, on gradients whose hull avoids 0: w_i <g_i, d> = 1 (Nash)
  and <g_i, d> = w_i^(-1/alpha) (FairGrad) to rounding; |d| = sqrt(K); FairGrad
  with alpha = 1 is Nash-MTL's solution; Nash's d is unchanged when each
  gradient is scaled by its own positive factor, FairGrad's scales as
  c^((1 - alpha) / (2 (1 + alpha))) when all are scaled by c."""
  rng = np.random.default_rng(12)
  nash = jax.jit(lambda g, m: agg.nash_mtl_weights(g, m, ridge=0.0))
  fair = jax.jit(lambda g, a: agg.fairgrad_weights(g, a, ridge=0.0))
  with enable_x64():
    for k, p in [(1, 3), (2, 6), (3, 5), (5, 12)]:
      jac = rng.standard_normal((k, p)) * rng.uniform(0.1, 10, size=(k, 1))
      jac += 2 * rng.standard_normal(p)  # a shared component: 0 is outside the hull
      gram = jnp.asarray(jac @ jac.T)
      w = np.asarray(nash(gram, None))
      d = w @ jac
      np.testing.assert_allclose(w * (jac @ d), 1, rtol=1e-12)
      np.testing.assert_allclose(np.linalg.norm(d), np.sqrt(k), rtol=1e-12)
      capped = np.asarray(nash(gram, 0.5)) @ jac
      np.testing.assert_allclose(capped, d * min(1, 0.5 / np.sqrt(k)), rtol=1e-12)
      c = rng.uniform(0.01, 100, size=(k, 1))
      rescaled = np.asarray(nash(jnp.asarray((c * jac) @ (c * jac).T), None)) @ (c * jac)
      np.testing.assert_allclose(rescaled, d, rtol=1e-10, atol=1e-12)
      np.testing.assert_allclose(np.asarray(fair(gram, 1.0)), w, rtol=1e-10)
      for alpha in (0.5, 2.0, 5.0):
        v = np.asarray(fair(gram, alpha))
        np.testing.assert_allclose((jac @ (v @ jac)) * v ** (1 / alpha), 1, rtol=1e-11)
        big = np.asarray(fair(1e6 * gram, alpha)) @ (1e3 * jac)
        want = v @ jac * 1e6 ** ((1 - alpha) / (2 * (1 + alpha)))
        np.testing.assert_allclose(big, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())
    np.testing.assert_allclose(np.asarray(fair(gram, 0.0)), np.full(k, 1 / k))


@pytest.mark.parametrize("name", ["nash_mtl", "fairgrad"])
def test_nash_mtl_and_fairgrad_degenerate_cases(name):
  """One gradient, identical, opposite, all zero, one zero, collinear: equal to
  the reference (which has the same ridge), opposite and zero give 0, and a
  zero gradient or an opposite pair adds nothing to the others' solution (up
  to the ridge for FairGrad, whose ridge is relative to the longest gradient)."""
  rule = JITTED[name]
  reference = RULES[name][1]
  with enable_x64():
    for jac in [G[None], np.stack([G, G, G]), np.stack([G, 2 * G]), np.stack([G, -G, 0 * G])]:
      d = np.asarray(rule(jnp.asarray(jac @ jac.T))) @ jac
      np.testing.assert_allclose(d, reference(jac), rtol=1e-10, atol=1e-12)
    other = np.array([1.0, 1.0, -1.0])  # orthogonal to G
    for jac, want in [
      (np.stack([G, -G]), 0 * G),
      (np.zeros((3, 3)), 0 * G),
      (np.stack([G, 0 * G]), reference(G[None])),
      (np.stack([G, -G, other]), reference(other[None])),  # the pair cancels
    ]:
      d = np.asarray(rule(jnp.asarray(jac @ jac.T))) @ jac
      tol = 1e-5 if name == "fairgrad" else 1e-9
      np.testing.assert_allclose(d, want, atol=tol * np.abs(jac).max())


def test_the_newton_budget_leaves_a_margin():
  """Half the fixed number of Newton steps already reaches the answer, on
  well-posed and ridge-degenerate problems (K > P, opposite gradients), for
  three alphas, in float32 and float64: one vmapped compilation per K, budget
  and dtype."""
  rng = np.random.default_rng(13)
  batches = {}
  for jac in random_jacobians(14, count=20) + [np.stack([G, -G, rng.standard_normal(3)])]:
    batches.setdefault(len(jac), []).append(jac @ jac.T)
  alphas = jnp.array([0.5, 1.0, 5.0])

  def run(steps, dtype, grams):
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(agg_impl, "FAIR_NEWTON_STEPS", steps)
      per_alpha = jax.vmap(agg.fairgrad_weights, (None, 0))
      rule = jax.jit(jax.vmap(per_alpha, (0, None)))
      return np.asarray(rule(jnp.asarray(np.stack(grams), dtype), alphas.astype(dtype)))

  full_steps = agg_impl.FAIR_NEWTON_STEPS
  # float32: once converged, the iterates of the ridge-degenerate problems (K > P,
  # alpha = 5: weights ~1e5 on a system with condition ~1e10) still move by up to
  # 3e-5 of the largest weight from step to step; unconverged ones differ by 0.1.
  for dtype, tol in [(jnp.float32, 1e-4), (jnp.float64, 1e-10)]:
    with enable_x64():
      for k, grams in batches.items():
        full = run(full_steps, dtype, grams)  # [batch, alpha, K]
        half = run(full_steps // 2, dtype, grams)
        scale = np.abs(full).max(axis=-1, keepdims=True)
        assert np.all(np.abs(half - full) <= tol * scale), (k, dtype)


def test_gradvac_rule_equals_the_reference_over_steps():
  """Random targets, orders and gradients for several steps: weights and the
  new targets equal the loop on vectors (float64)."""
  rng = np.random.default_rng(15)
  rule = jax.jit(agg.gradvac_weights)
  with enable_x64():
    for k in (1, 2, 3, 5):
      targets = rng.uniform(-1, 1, (k, k))
      for step in range(4):
        jac = rng.standard_normal((k, 6)) * rng.uniform(0.1, 10, size=(k, 1))
        if step == 1 and k > 1:
          jac[1] = -0.7 * jac[0] + 0.1 * rng.standard_normal(6)
        orders = np.stack([rng.permutation(k) for _ in range(k)])
        w, new = rule(jnp.asarray(jac @ jac.T), jnp.asarray(targets), jnp.asarray(orders), 0.3)
        want, want_targets = ref.gradvac(jac, targets, orders, 0.3)
        assert direction_error(w, jac, want) < 1e-10, (k, step)
        off = ~np.eye(k, dtype=bool)
        np.testing.assert_allclose(np.asarray(new)[off], want_targets[off], atol=1e-12)
        targets = want_targets


def test_gradvac_transform_keeps_its_targets_and_follows_the_key():
  """Float32 on pytrees over 4 steps against the reference fed the same orders
  (from the key in the state) and its own targets; targets 0 at the first step
  make it PCGrad; the degenerate cases."""
  k = 3
  seq = sequence(16, k, 4)
  tx = agg.gradvac(k, target_decay=0.5, key=3)
  state = tx.init(seq[0][0])
  targets = np.zeros((k, k))
  update = jax.jit(tx.update)
  for step, grads in enumerate(seq):
    key = jax.random.split(state.rng_key)[1]
    orders = np.asarray(
      jax.vmap(lambda kk: jax.random.permutation(kk, k))(jax.random.split(key, k))
    )
    jac = np.stack([flat(g) for g in grads])
    d, state = update(grads, state)
    want, targets = ref.gradvac(jac, targets, orders, 0.5)
    assert np.abs(flat(d) - want).max() <= 1e-5 * np.abs(want).max(), step
    if step == 0:
      np.testing.assert_allclose(want, ref.pcgrad(jac, orders), rtol=1e-12)
    off = ~np.eye(k, dtype=bool)
    np.testing.assert_allclose(np.asarray(state.rule_state)[off], targets[off], atol=1e-5)
  with enable_x64():
    for jac, want in [
      (G[None], G),
      (np.stack([G, G, G]), 3 * G),
      (np.stack([G, -G]), 0 * G),
      (np.zeros((3, 3)), 0 * G),
      (np.stack([G, 0 * G]), G),
    ]:
      k = len(jac)
      w, _ = agg.gradvac_weights(
        jnp.asarray(jac @ jac.T), jnp.zeros((k, k)), jnp.tile(jnp.arange(k), (k, 1))
      )
      np.testing.assert_allclose(np.asarray(w) @ jac, want, atol=1e-12)


@pytest.mark.parametrize("inner", ["mgda", "upgrad_ema"])
def test_cr_mogm_is_an_ema_of_the_inner_weights(inner):
  """The applied weights are the EMA (decay 0.7, started at the first choice)
  of the weights the wrapped aggregator reports, run on its own; decay 0 is
  the wrapped aggregator; a NaN step is passed through and leaves the EMA."""
  k = 3
  seq = sequence(17, k, 5)
  make = (lambda: agg.mgda(k)) if inner == "mgda" else (lambda: agg.upgrad(k, ema_decay=0.8))
  alone, tx, plain = make(), agg.cr_mogm(make(), decay=0.7), agg.cr_mogm(make(), decay=0.0)
  sa, st, sp = alone.init(seq[0][0]), tx.init(seq[0][0]), plain.init(seq[0][0])
  lam = None
  for grads in seq:
    da, sa = jax.jit(alone.update)(grads, sa)
    d, st = jax.jit(tx.update)(grads, st)
    dp, sp = jax.jit(plain.update)(grads, sp)
    chosen = np.asarray(sa.objective_weights, np.float64)
    lam = chosen if lam is None else 0.7 * lam + 0.3 * chosen
    jac = np.stack([flat(g) for g in grads])
    np.testing.assert_allclose(st.objective_weights, lam, rtol=1e-6)
    np.testing.assert_allclose(flat(d), lam @ jac, rtol=1e-5, atol=1e-5 * np.abs(jac).max())
    np.testing.assert_allclose(flat(dp), flat(da), rtol=1e-6, atol=1e-6)
  bad = (seq[0][0], jax.tree.map(lambda x: x * jnp.nan, seq[0][1]), seq[0][2])
  d, after = jax.jit(tx.update)(bad, st)
  assert np.all(np.isnan(flat(d)))
  np.testing.assert_array_equal(after.objective_weights, st.objective_weights)


@pytest.mark.parametrize(
  ("make", "error", "match"),
  [
    (lambda: agg.nash_mtl(2, max_norm=0.0), ValueError, "max_norm"),
    (lambda: agg.nash_mtl(2, ridge=-1.0), ValueError, "ridge"),
    (lambda: agg.fairgrad(2, alpha=-1.0), ValueError, "alpha"),
    (lambda: agg.gradvac(2, target_decay=1.5), ValueError, "target_decay"),
    (lambda: agg.gradvac(2, key=None), TypeError, "PRNG key"),
    (lambda: agg.cr_mogm(agg.upgrad(2), decay=2.0), ValueError, "decay"),
    (lambda: agg.cr_mogm("upgrad"), TypeError, "GradientTransformation"),
    (lambda: agg.cr_mogm(optax.sgd(1.0)).init(jnp.zeros(2)), TypeError, "AggregatorState"),
  ],
)
def test_bad_arguments_of_the_stateful_and_fair_rules_raise(make, error, match):
  with pytest.raises(error, match=match):
    make()


def test_moco_tracks_steps_its_weights_and_follows_the_tracked_gradients():
  """Float32 on pytrees over 6 steps against the NumPy loop (EMAs, one
  projected step of the weights, d from the tracked gradients); the simplex
  projection against bisection; ema_decay 0 tracks nothing."""
  k = 3
  seq = sequence(18, k, 6)
  for decay, step, rho in [(0.8, 0.3, 0.0), (0.0, 1.0, 0.1)]:
    tx = agg.moco(k, ema_decay=decay, step_size=step, rho=rho)
    state = tx.init(seq[0][0])
    update = jax.jit(tx.update)
    jacs = [np.stack([flat(g) for g in grads]) for grads in seq]
    want = ref.moco(jacs, decay, step, rho)
    for grads, (d_want, lam) in zip(seq, want, strict=True):
      d, state = update(grads, state)
      np.testing.assert_allclose(state.rule_state, lam, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(state.objective_weights, lam, rtol=1e-5, atol=1e-6)
      assert np.abs(flat(d) - d_want).max() <= 2e-5 * np.abs(d_want).max()
  rng = np.random.default_rng(19)
  project = jax.jit(agg_impl._onto_simplex)
  with enable_x64():
    for k in (1, 2, 5, 9):
      v = rng.standard_normal(k) * rng.uniform(0.1, 5)
      np.testing.assert_allclose(project(jnp.asarray(v)), ref.onto_simplex(v), atol=1e-12)


def test_moco_without_ema_decay_raises():
  with pytest.raises(TypeError, match="tracks the gradients"):
    agg.moco(2, ema_decay=None)
  with pytest.raises(ValueError, match="step_size"):
    agg.moco(2, step_size=0.0)


def test_nash_mtl_fairgrad_and_moco_are_permutation_equivariant():
  """Relabelling the objectives relabels the weights (and MoCo's step)."""
  rng = np.random.default_rng(20)
  rules = {
    "nash_mtl": jax.jit(lambda g, w: agg.nash_mtl_weights(g)),
    "fairgrad": jax.jit(lambda g, w: agg.fairgrad_weights(g, 2.0)),
    "moco": jax.jit(lambda g, w: agg.moco_weights(g, w, 0.3, 0.1)),
  }
  with enable_x64():
    for _ in range(3):
      jac = rng.standard_normal((5, 4)) * rng.uniform(0.1, 10, size=(5, 1))
      lam = rng.dirichlet(np.ones(5))
      perm = rng.permutation(5)
      gram = jnp.asarray(jac @ jac.T)
      for name, rule in rules.items():
        w = np.asarray(rule(gram, jnp.asarray(lam)))
        permuted = rule(gram[perm][:, perm], jnp.asarray(lam[perm]))
        np.testing.assert_allclose(
          np.asarray(permuted), w[perm], rtol=1e-9, atol=1e-12, err_msg=name
        )
