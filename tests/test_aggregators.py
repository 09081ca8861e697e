"""The multi-objective aggregators against a NumPy reference written from each
method's paper, their degenerate cases, the EMA option and bad input."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bloop_optax
from bloop_optax import _qp
from bloop_optax import aggregators as agg
from tests import reference_mtl as ref
from tests.aggregator_cases import ALL
from tests.aggregator_cases import FACTORIES
from tests.aggregator_cases import JITTED
from tests.aggregator_cases import RULES
from tests.aggregator_cases import G
from tests.aggregator_cases import direction_error
from tests.aggregator_cases import random_jacobians
from tests.aggregator_cases import run_rule
from tests.aggregator_cases import sequence
from tests.helpers import enable_x64
from tests.helpers import flat
from tests.helpers import random_tree

pytestmark = pytest.mark.usefixtures("strict_dtype_promotion")


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
      two_task = bloop_optax.pcgrad_pair(1.0)
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
        _, _, its, _ = solve(q, jnp.zeros([k]), x0, x0 > 0, simplex=True)
        assert int(its) < _qp.ACTIVE_SET_BUDGET(k) // 2, (k, int(its))
        u = jnp.eye(k)[0] / k
        _, _, its, _ = solve(q, q @ u, jnp.zeros([k]), jnp.zeros([k], bool), simplex=False)
        assert int(its) < _qp.ACTIVE_SET_BUDGET(k) // 2, (k, int(its))


def _padded_inverse(q, free):
  """NumPy: the inverse of the free block of ``q`` padded with identity rows."""
  a = np.where(np.outer(free, free), q, 0) + np.diag(1.0 - free)
  return np.linalg.inv(a)


@pytest.mark.parametrize("simplex", [True, False])
def test_carried_inverse_solves_as_the_pseudo_inverse_or_is_rebuilt(simplex):
  """The active set's carried inverse of the free block: rebuilt, it stands
  exactly where the block is safely nonsingular (not for repeated, dependent or
  zero gradients, nor a diagonal block under the pseudo-inverse's cutoff), and
  its solve then equals the pseudo-inverse's; carried across one index entering
  or leaving it equals the new block's inverse, and is invalid where the new
  block is singular or several indices changed at once."""
  rng = np.random.default_rng(16)
  rebuilt = jax.jit(_qp._rebuilt)
  solve = jax.jit(_qp._solve_with, static_argnames="simplex")
  exact = jax.jit(_qp._free_set_solution, static_argnames="simplex")
  updated = jax.jit(_qp._updated)
  with enable_x64():
    for k, p in [(6, 12), (6, 3), (9, 4), (7, 9)]:
      jac = rng.standard_normal((k, p)) * rng.uniform(0.5, 2, size=(k, 1))
      jac[1] = jac[0] if p < k else jac[1]  # a repeated row where the rank is short anyway
      jac[-1] = 0 if k == 9 else jac[-1]
      if k == 7:  # nearly repeated: Q_FF's smallest eigenvalue about 1e-18, below the cutoff
        jac[2] = jac[3] + 1e-9 * rng.standard_normal(p)
      q = jac @ jac.T
      q = q / np.max(np.diag(q))
      for _ in range(8):
        free = rng.random(k) < 0.6
        c = rng.standard_normal(k)
        if simplex and not free.any():
          continue
        inv, stands = rebuilt(jnp.asarray(q), jnp.asarray(free))
        block = q[np.ix_(free, free)]
        smallest = np.linalg.eigvalsh(block)[0] if free.any() else 1.0
        if smallest > 1e-6 or smallest < 1e-15:  # clearly invertible or not at the cutoff
          assert bool(stands) == (smallest > 1e-6), (k, p, free, smallest)
        if not stands:
          continue
        np.testing.assert_allclose(inv, _padded_inverse(q, free), rtol=1e-8, atol=1e-8)
        z, ok = solve(jnp.asarray(q), jnp.asarray(c), jnp.asarray(free), inv, simplex=simplex)
        want = exact(jnp.asarray(q), jnp.asarray(c), jnp.asarray(free), simplex=simplex)
        assert bool(ok)
        np.testing.assert_allclose(z, want, rtol=1e-9, atol=1e-9 * np.max(np.abs(want)))
        for change in rng.permutation(k)[:3]:  # one index enters or leaves
          new = free.copy()
          new[change] = ~new[change]
          carried, valid = updated(jnp.asarray(q), jnp.asarray(free), jnp.asarray(new), inv, True)
          block = q[np.ix_(new, new)]
          smallest = np.linalg.eigvalsh(block)[0] if new.any() else 1.0
          if smallest > 1e-6:
            assert bool(valid), (k, p, free, new)
            np.testing.assert_allclose(carried, _padded_inverse(q, new), rtol=1e-7, atol=1e-7)
          elif smallest < 1e-15:
            assert not bool(valid), (k, p, free, new, smallest)
        both = free.copy()
        both[:2] = ~both[:2]  # two indices at once: rebuilt at the next iteration
        assert not bool(updated(jnp.asarray(q), jnp.asarray(free), jnp.asarray(both), inv, True)[1])
    # A start's inverse without a factorisation: exact for no free index or one
    # with a positive diagonal entry, invalid (rebuilt) otherwise.
    start = jax.jit(_qp.start_inverse)
    q = np.diag([2.0, 0.0, 0.5]) + 0.1 * np.ones((3, 3))
    q[1, 1] = 0.0
    for free, stands in [
      ([0, 0, 0], True),
      ([1, 0, 0], True),
      ([0, 0, 1], True),
      ([0, 1, 0], False),
      ([1, 0, 1], False),
    ]:
      free = np.asarray(free, bool)
      inv, valid = start(jnp.asarray(q), jnp.asarray(free))
      assert bool(valid) == stands, free
      if stands:
        np.testing.assert_allclose(inv, _padded_inverse(q, free), rtol=1e-15)
    # A positive definite block whose smallest eigenvalue is below the
    # pseudo-inverse's cutoff (which drops it): its exact inverse does not stand.
    q = jnp.diag(jnp.asarray([1.0, 0.5, 1e-17, 1e-6]))
    assert not bool(rebuilt(q, jnp.asarray([True, True, True, False]))[1])
    assert bool(rebuilt(q, jnp.asarray([True, True, False, True]))[1])


def test_batched_active_set_equals_each_problem_alone():
  """B problems on one Q solved together stop one by one: each ends where it
  ends alone, with its own iteration count (dependent rows included), and the
  carried inverse takes the same steps as the per-iteration pseudo-inverse."""
  rng = np.random.default_rng(17)
  solve = jax.jit(_qp.active_set, static_argnames=("simplex", "carry"))
  with enable_x64():
    for k, p in [(7, 14), (7, 4)]:
      jac = rng.standard_normal((k, p))
      q = jnp.asarray(jac @ jac.T / np.max(np.sum(jac**2, axis=1)))
      cs = jnp.asarray(rng.standard_normal((5, k)))
      zeros = jnp.zeros([5, k])
      starts = jnp.eye(k)[:5]
      for simplex, x0 in [(False, zeros), (True, starts)]:
        x, free, its, _ = solve(q, cs, x0, x0 > 0, simplex=simplex, carry=True)
        plain = solve(q, cs, x0, x0 > 0, simplex=simplex, carry=False)
        np.testing.assert_allclose(x, plain[0], rtol=1e-10, atol=1e-12)
        assert (np.asarray(free) == np.asarray(plain[1])).all()
        assert (np.asarray(its) == np.asarray(plain[2])).all()
        for b in range(5):
          one = solve(q, cs[b], x0[b], x0[b] > 0, simplex=simplex, carry=True)
          np.testing.assert_allclose(x[b], one[0], rtol=1e-12, atol=1e-14)
          assert (np.asarray(free[b]) == np.asarray(one[1])).all() and int(its[b]) == int(one[2])
          if simplex:
            assert abs(float(jnp.sum(x[b])) - 1) < 1e-12 and float(jnp.min(x[b])) >= 0


# ------------------------------------------------------------------- EMA


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


@pytest.mark.parametrize("form", ["pairwise", "stacked", "blockwise", "split"])
@pytest.mark.parametrize("scale", [1.0, 1e30])
def test_gram_equals_the_exact_gram_at_any_scale(scale, form, monkeypatch):
  """Every form of the Gram matrix (pairwise sums for at most 4 trees; else one
  stacked product per leaf; on one CPU device, large leaves' products
  accumulated over blocks, here blocks of 2 elements so that leaves of 5, 7
  and 24 elements end with and without a partial block, each block's product
  whole or, past SPLIT_ABOVE_K trees, in the three parts of a symmetric
  matrix: trees 0-7 with themselves, with 8-11, and 8-11 with themselves)
  equals the float64 Gram matrix, also where float32 sums overflow, and NaN
  inputs are told apart from overflow."""
  k = 4 if form == "pairwise" else 12  # the pairwise form is for at most 4 trees
  tree_math = bloop_optax._tree_math
  if form != "pairwise":  # the forms taken for very many objectives or leaves
    monkeypatch.setattr(tree_math, "MAX_PAIRWISE_REDUCTIONS", 0)
  if form in ("blockwise", "split"):
    monkeypatch.setattr(tree_math, "MIN_BLOCK", 2)
    monkeypatch.setattr(tree_math, "BLOCK_BYTES", 4 * k * 2)
    monkeypatch.setattr(tree_math, "SPLIT_ABOVE_K", 8 if form == "split" else k)
  else:
    monkeypatch.setattr(tree_math, "_blockwise_here", lambda: False)
  rng = np.random.default_rng(11)
  trees = tuple(random_tree(rng, scale=scale * float(s)) for s in rng.uniform(0.1, 3, k))

  def share(trees):
    """Trees 0 and 1 with one array at their first leaf (as value_and_grads'
    losses share a zero array), 1e20 times smaller than the other trees' there:
    every tree's leaf must still be scaled by its own maximum (a tree given the
    shared array's scale overflows)."""
    leaves, treedef = jax.tree.flatten(trees[0])
    first = [leaves[0] * 1e-20]
    pair = tuple(jax.tree.unflatten(treedef, first + jax.tree.leaves(t)[1:]) for t in trees[:2])
    return pair + tuple(trees[2:])

  jac = np.stack([flat(t) for t in share(trees)])
  # A function of its own: jax.jit(tree_math.gram) would reuse the program that an
  # earlier case traced under other settings. The shared array is made inside it
  # (arguments are distinct arrays there even when they are one object outside).
  gram = jax.jit(lambda trees: tree_math.gram(share(trees)))
  program = gram.lower(trees).as_text()
  products = set(re.findall(r"stablehlo.dot_general.*-> tensor<(\d+x\d+)x", program))
  if form == "pairwise":
    assert not products
  else:  # the leaves of 1 and 3 elements are one product whole
    assert products == ({f"{k}x{k}", "8x8", "8x4", "4x4"} if form == "split" else {f"{k}x{k}"})
  loops = program.count("stablehlo.while")
  # 3 leaves x (the product; the rescaled branch's maxima, then its product)
  assert loops == (9 if form in ("blockwise", "split") else 0)
  dots = gram(trees)
  exps = np.asarray(dots.exps, np.float64)
  got = np.asarray(dots.values, np.float64) * 2.0 ** (exps[:, None] + exps[None, :])
  want = jac @ jac.T
  assert bool(dots.finite)
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
  if scale > 1:
    assert exps.max() > 0  # the slow branch ran
  bad = (jax.tree.map(lambda x: x.at[...].set(jnp.nan), trees[0]),) + trees[1:]
  assert not bool(gram(bad).finite)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_many_objectives_give_the_exact_direction(name, monkeypatch):
  """K = 12 with the Gram matrix in its stacked form (as past
  MAX_PAIRWISE_REDUCTIONS) and the QPs' carried inverse (as from CARRY_FROM_K
  and CARRY_SINGLE_FROM_K): the transform under jit equals the rule applied to
  the exact Gram matrix (1e-4 relative)."""
  k = 12
  rng = np.random.default_rng(12)
  grads = tuple(random_tree(rng, scale=float(s)) for s in rng.uniform(0.5, 3, k))
  jac = np.stack([flat(g) for g in grads])
  want = weights_on_exact_gram(name, jac, k) @ jac  # the QPs' small-K solver
  monkeypatch.setattr(bloop_optax._tree_math, "MAX_PAIRWISE_REDUCTIONS", 0)
  monkeypatch.setattr(_qp, "CARRY_FROM_K", 0)  # the QPs' large-K solver at K = 12
  monkeypatch.setattr(_qp, "CARRY_SINGLE_FROM_K", 0)
  tx = FACTORIES[name](k)
  d, state = jax.jit(tx.update)(grads, tx.init(grads[0]))
  got = flat(d)
  assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), name
  assert int(state.skipped_steps) == 0
