"""The aggregators added after the first seven: DualProj, ConFIG, Krum, Random,
Constant, Nash-MTL, FairGrad, GradVac, CR-MOGM and MoCo, each against its
reference, its invariances and its bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bloop_optax import aggregators as agg
from bloop_optax.aggregators import _fairness
from bloop_optax.aggregators import _linalg
from tests import reference_mtl as ref
from tests.aggregator_cases import JITTED
from tests.aggregator_cases import RULES
from tests.aggregator_cases import G
from tests.aggregator_cases import direction_error
from tests.aggregator_cases import random_jacobians
from tests.aggregator_cases import sequence
from tests.helpers import enable_x64
from tests.helpers import flat

pytestmark = pytest.mark.usefixtures("strict_dtype_promotion")


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
  [
    agg.dualproj_weights,
    agg.config_weights,
    lambda g: agg.krum_weights(g, n_byzantine=1, n_selected=2),
  ],
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
      rule = jax.jit(agg.krum_weights, static_argnames=("n_byzantine", "n_selected"))
      weights = rule(jnp.asarray(jac @ jac.T), n_byzantine=f, n_selected=m)
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
  tx = agg.constant(2, jnp.ones(2))
  d, state = tx.update(grads, tx.init(grads[0]))
  np.testing.assert_allclose(d, grads[0] + grads[1])
  tx = agg.constant(2, [0.25, 2.0])
  d, _ = jax.jit(tx.update)(grads, tx.init(grads[0]))
  np.testing.assert_allclose(d, 0.25 * grads[0] + 2.0 * grads[1])


@pytest.mark.parametrize(
  ("make", "match"),
  [
    (lambda: agg.krum(3, n_byzantine=1), "K >= n_byzantine \\+ 3"),
    (lambda: agg.krum(5, n_selected=6), "n_selected"),
    (lambda: agg.krum(5, n_byzantine=-1), "n_byzantine"),
    (lambda: agg.constant(2, [[1.0, 2.0]]), "1-d sequence"),
    (lambda: agg.constant(2, [1.0, float("nan")]), "finite"),
    (lambda: agg.constant(3, [1.0, 2.0]), "expected 3 weights"),
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
  nash = jax.jit(lambda g, m: agg.nash_mtl_weights(g, max_norm=m, ridge=0.0))
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


def test_the_newton_budget_leaves_a_margin_and_the_early_stop_ends_where_it_does():
  """On well-posed and ridge-degenerate problems (K > P, opposite gradients),
  for three alphas, in float32 and float64, against all FAIR_NEWTON_STEPS
  steps: half the budget already reaches the answer, and so does the early stop
  (a step that moves every weight by at most a few units of its last place).
  One vmapped compilation per K, budget, stop and dtype."""
  rng = np.random.default_rng(13)
  jacs = random_jacobians(14, count=20) + [np.stack([G, -G, rng.standard_normal(3)])]
  batches = {}
  for jac in jacs:
    batches.setdefault(len(jac), []).append(jac @ jac.T)
  alphas = jnp.array([0.5, 1.0, 5.0])

  def run(steps, ulps, dtype, grams):
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(_fairness, "FAIR_NEWTON_STEPS", steps)
      mp.setattr(_fairness, "FAIR_STOP_ULPS", ulps)  # -1: never stops early
      per_alpha = jax.vmap(agg.fairgrad_weights, (None, 0))
      rule = jax.jit(jax.vmap(per_alpha, (0, None)))
      return np.asarray(rule(jnp.asarray(np.stack(grams), dtype), alphas.astype(dtype)))

  budget, ulps = _fairness.FAIR_NEWTON_STEPS, _fairness.FAIR_STOP_ULPS
  # float32: once converged, the iterates of the ridge-degenerate problems (K > P,
  # alpha = 5: weights ~1e5 on a system with condition ~1e10) still move by up to
  # 2e-4 of the largest weight from step to step (how far depends on the compiled
  # code's rounding); unconverged ones (5 steps) differ by 4e-3 to 0.97.
  for dtype, tol, stop_tol in [(jnp.float32, 1e-3, 1e-3), (jnp.float64, 1e-10, 1e-12)]:
    with enable_x64():
      for k, grams in batches.items():
        full = run(budget, -1, dtype, grams)  # [batch, alpha, K]
        scale = np.abs(full).max(axis=-1, keepdims=True)
        half = run(budget // 2, -1, dtype, grams)
        assert np.all(np.abs(half - full) <= tol * scale), (k, dtype)
        stopped = run(budget, ulps, dtype, grams)
        assert np.all(np.abs(stopped - full) <= stop_tol * scale), (k, dtype)

  # The stop does fire where the gradients are far from collinear (float64).
  count = jax.jit(lambda a, p: _fairness._alpha_fair(a, p, count=True)[1])
  with enable_x64():
    for jac in jacs:
      norms = np.linalg.norm(jac, axis=1)
      cosines = (jac @ jac.T) / np.outer(norms, norms)
      if np.linalg.eigvalsh(cosines)[0] < 0.1:
        continue  # nearly collinear: rounding through the Hessian may exceed the stop
      cosines = jnp.asarray(cosines, jnp.float64)
      for p in (2.0, 1.0, 0.2):
        assert int(count(cosines, jnp.float64(p))) < budget, (jac, p)


def test_gradvac_rule_equals_the_reference_over_steps():
  """Random targets, orders and gradients for several steps: weights and the
  new targets equal the loop on vectors (float64)."""
  rng = np.random.default_rng(15)
  rule = jax.jit(lambda g, t, o, d: agg.gradvac_weights(g, t, o, target_decay=d))
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
  alone, tx, plain = (
    make(),
    agg.cr_mogm(make(), weights_decay=0.7),
    agg.cr_mogm(make(), weights_decay=0.0),
  )
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
    (lambda: agg.cr_mogm(agg.upgrad(2), weights_decay=2.0), ValueError, "decay"),
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
  project = jax.jit(_linalg._onto_simplex)
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
    "moco": jax.jit(lambda g, w: agg.moco_weights(g, w, step_size=0.3, rho=0.1)),
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
