"""Priority-Constrained Descent against a brute-force NumPy reference written
from its definition, its special cases, its invariances and its guarantee."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bloop_optax
from bloop_optax import aggregators as agg
from tests import reference_pcd as ref
from tests.helpers import enable_x64
from tests.helpers import flat
from tests.helpers import random_tree

pytestmark = pytest.mark.optax_optimizer


def jacobians(seed, k, p=6, steps=5, kind="random"):
  """``steps`` K x P matrices with rows of unlike scales; ``kind`` picks a
  degenerate family."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    jac = rng.standard_normal((k, p)) * rng.uniform(0.05, 20.0, size=(k, 1))
    if kind == "conflict":  # every aux against the main gradient
      jac[1:] -= 2.0 * jac[0] * rng.uniform(0.5, 1.5, size=(k - 1, 1))
    elif kind == "anti_parallel":  # two aux gradients in opposite directions
      jac[2] = -rng.uniform(0.5, 3.0) * jac[1]
    elif kind == "k_over_p":
      jac = rng.standard_normal((k, 2)) @ rng.standard_normal((2, p))
    elif kind == "zero_main":
      jac[0] = 0.0
    elif kind == "zero_aux":
      jac[1] = 0.0
    out.append(jac)
  return out


def updates(rows):
  rows = [jnp.asarray(r) for r in rows]  # a K x P matrix's rows, or a list of them
  return bloop_optax.MainAux(*rows) if len(rows) == 2 else tuple(rows)


def run(tx, jacs, like=None):
  state = tx.init(jnp.zeros(jacs[0].shape[1]) if like is None else like)
  step = jax.jit(tx.update)
  out = []
  for jac in jacs:
    d, state = step(updates(jac), state)
    out.append(np.asarray(d, np.float64))
  return out, state


CASES = [
  (2, "random"),
  (2, "conflict"),
  (2, "zero_main"),
  (2, "zero_aux"),
  (3, "random"),
  (3, "conflict"),
  (3, "anti_parallel"),
  (4, "conflict"),
  (4, "k_over_p"),
  (5, "random"),
  (6, "k_over_p"),
]


TAUS = (0.0, 0.02, 0.3, 1.0)


@functools.cache
def trajectories(k):
  """One compiled program per K: PCD over a sequence of steps, for every tau."""

  def trajectory(tau, jacs):
    tx = bloop_optax.pcd(tau, num_objectives=k)

    def step(state, jac):
      d, state = tx.update(updates(list(jac)), state)
      return state, d

    return jax.lax.scan(step, tx.init(jnp.zeros(jacs.shape[-1], jacs.dtype)), jacs)

  return jax.jit(jax.vmap(trajectory, in_axes=(0, None)))


@pytest.mark.parametrize(("k", "kind"), CASES, ids=[f"{k}-{kind}" for k, kind in CASES])
def test_matches_the_reference_in_float64(k, kind):
  with enable_x64():
    jacs = jacobians(10 * k + len(kind), k, kind=kind)
    state, got = trajectories(k)(jnp.asarray(TAUS), jnp.asarray(np.stack(jacs)))
    for i, tau in enumerate(TAUS):
      reference = ref.PCD(tau)
      for g, jac in zip(np.asarray(got[i]), jacs, strict=True):
        want = reference(jac)
        np.testing.assert_allclose(g, want, rtol=1e-10, atol=1e-10 * np.max(np.abs(jac)))
    np.testing.assert_array_equal(state.rule_state.count, len(jacs))


def test_per_aux_taus_and_the_guarantee():
  """tau one per aux; whenever the constraints can hold, each aux keeps its
  fraction: <g~_j, d~> >= tau_j |g~_j|^2 with d~ = d s_1 / w_1."""
  taus = (0.1, 0.5, 0.9)
  with enable_x64():
    jacs = jacobians(3, 4, kind="conflict", steps=6)
    tx = bloop_optax.pcd(taus, num_objectives=4, eps=0.0)
    state = tx.init(jnp.zeros(6))
    reference = ref.PCD(taus, eps=0.0)
    step = jax.jit(tx.update)
    for jac in jacs:
      d, state = step(updates(jac), state)
      np.testing.assert_allclose(d, reference(jac), rtol=1e-10, atol=1e-10 * np.max(np.abs(jac)))
      scales = 1 / np.sqrt(reference.ema / (1 - 0.999**reference.count))
      w = np.asarray(state.objective_weights, np.float64)
      d_tilde = np.asarray(d) * scales[0] / w[0]
      normalised = jac * scales[:, None]
      progress = normalised[1:] @ d_tilde
      floor = np.asarray(taus) * np.sum(normalised[1:] ** 2, axis=1)
      assert np.all(progress >= floor * (1 - 1e-6))  # objective_weights are float32


def test_special_cases():
  main, aux = jnp.array([1.0, 0.0, 0.0]), jnp.array([0.0, 1.0, 0.0])
  tx = bloop_optax.pcd(0.3)
  state = tx.init(jnp.zeros(3))
  # g_1 = 0: no step, whatever the aux.
  d, state = jax.jit(tx.update)(bloop_optax.MainAux(jnp.zeros(3), aux), state)
  np.testing.assert_array_equal(d, 0.0)
  # Anti-parallel aux gradients with tau > 0 cannot both progress: d = g_1.
  three = bloop_optax.pcd(0.3, num_objectives=3)
  d, _ = jax.jit(three.update)((main, aux, -2.0 * aux), three.init(jnp.zeros(3)))
  np.testing.assert_allclose(d, main, rtol=1e-6)
  # With tau = 0 they can (d orthogonal to both): the main gradient is kept.
  zero = bloop_optax.pcd(0.0, num_objectives=3)
  d, _ = jax.jit(zero.update)((main + aux, aux, -2.0 * aux), zero.init(jnp.zeros(3)))
  np.testing.assert_allclose(d, main * np.sqrt(2.0), rtol=1e-6)


def test_a_non_finite_step_returns_nan_and_leaves_the_averages():
  tx = bloop_optax.pcd(0.3)
  params = {"w": jnp.zeros(3)}
  good = bloop_optax.MainAux({"w": jnp.array([1.0, 2.0, 0.0])}, {"w": jnp.array([-1.0, 0.0, 1.0])})
  bad = bloop_optax.MainAux({"w": jnp.array([1.0, jnp.inf, 0.0])}, good.aux)
  _, state = tx.update(good, tx.init(params))
  d, after = jax.jit(tx.update)(bad, state)
  assert np.all(np.isnan(d["w"]))
  assert int(after.skipped_steps) == 1
  for a, b in zip(
    jax.tree.leaves(after.rule_state), jax.tree.leaves(state.rule_state), strict=True
  ):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("k", [2, 3])
def test_scale_invariance(k):
  """Rescaling an aux objective at every step leaves the direction unchanged;
  rescaling the main one rescales it (eps = 0 makes both exact)."""
  with enable_x64():
    jacs = jacobians(7, k, kind="conflict")
    base, _ = run(bloop_optax.pcd(0.4, num_objectives=k, eps=0.0), jacs)
    aux_scaled, _ = run(
      bloop_optax.pcd(0.4, num_objectives=k, eps=0.0),
      [j * np.r_[1.0, [1e3] * (k - 1)][:, None] for j in jacs],
    )
    main_scaled, _ = run(
      bloop_optax.pcd(0.4, num_objectives=k, eps=0.0),
      [j * np.r_[1e-3, [1.0] * (k - 1)][:, None] for j in jacs],
    )
    for b, a, m in zip(base, aux_scaled, main_scaled, strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
      np.testing.assert_allclose(m, 1e-3 * b, rtol=1e-9, atol=1e-15)


def test_float32_pytrees_and_huge_norms():
  """On pytrees in float32 against the reference (1e-5), and at norms whose
  float32 squares overflow (1e30) the same direction, scaled."""
  rng = np.random.default_rng(4)
  steps = [[random_tree(rng) for _ in range(3)] for _ in range(4)]
  steps[1][1] = jax.tree.map(lambda m, a: -1.5 * m + 0.2 * a, steps[1][0], steps[1][1])
  like = steps[0][0]
  tx = bloop_optax.pcd(0.25, num_objectives=3, eps=0.0)
  reference = ref.PCD(0.25, eps=0.0)
  state, huge_state = tx.init(like), tx.init(like)
  for trees in steps:
    d, state = jax.jit(tx.update)(tuple(trees), state)
    want = reference(np.stack([flat(t) for t in trees]))
    np.testing.assert_allclose(flat(d), want, rtol=1e-5, atol=1e-5 * np.max(np.abs(want)))
    big = tuple(jax.tree.map(lambda x: x * 1e30, t) for t in trees)
    d_big, huge_state = jax.jit(tx.update)(big, huge_state)
    assert np.all(np.isfinite(flat(d_big)))
    np.testing.assert_allclose(
      flat(d_big) / 1e30, flat(d), rtol=1e-5, atol=1e-5 * np.max(np.abs(want))
    )
    assert jax.tree.structure(d) == jax.tree.structure(like)


def test_deciding_from_emas_of_the_gradients():
  """ema_decay: the program is solved on the EMAs' Gram matrix (and their norms),
  and the weights combine the current gradients."""
  with enable_x64():
    jacs = jacobians(11, 3, p=8, kind="conflict", steps=6)
    got, state = run(bloop_optax.pcd(0.3, num_objectives=3, ema_decay=0.8), jacs)
    reference, ema = ref.PCD(0.3), np.zeros_like(jacs[0])
    for g, jac in zip(got, jacs, strict=True):
      ema = 0.8 * ema + 0.2 * jac
      np.testing.assert_allclose(
        g, reference(jac, decide_from=ema), rtol=1e-9, atol=1e-9 * np.max(np.abs(jac))
      )
    assert state.grad_emas is not None


def test_tau_schedule_through_inject_hyperparams():
  schedule = optax.linear_schedule(0.0, 0.8, 4)
  tx = optax.inject_hyperparams(bloop_optax.pcd, static_args=("num_objectives",))(tau=schedule)
  jacs = [np.asarray(j, np.float32) for j in jacobians(5, 2, kind="conflict", steps=5)]
  got, _ = run(tx, jacs)
  reference = ref.PCD(0.0)
  for step, (g, jac) in enumerate(zip(got, jacs, strict=True)):
    reference.tau = float(schedule(step))
    np.testing.assert_allclose(g, reference(jac), rtol=2e-5, atol=2e-5 * np.max(np.abs(jac)))


def test_pcd_weights_is_the_rule_on_a_gram_matrix():
  with enable_x64():
    rng = np.random.default_rng(9)
    jac = rng.standard_normal((3, 5))
    scales = 1 / np.linalg.norm(jac, axis=1)
    w = agg.pcd_weights(jnp.asarray(jac @ jac.T), jnp.asarray(scales), tau=0.5)
    d_tilde = ref.solve(jac * scales[:, None], (0.5, 0.5))
    want = d_tilde * np.linalg.norm(jac[0]) / np.linalg.norm(d_tilde)
    np.testing.assert_allclose(np.asarray(w) @ jac, want, rtol=1e-10)


def test_pair_forms_and_bad_arguments():
  main, aux = {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([-1.0, 1.0])}
  tx = bloop_optax.pcd(0.5)
  state = tx.init(main)
  d1, _ = tx.update(bloop_optax.MainAux(main, aux), state)
  d2, _ = tx.update({"main": main, "aux": aux}, state)  # the nnx.State of a MainAux
  np.testing.assert_array_equal(d1["w"], d2["w"])
  with pytest.raises(ValueError, match="one per secondary"):
    bloop_optax.pcd((0.1, 0.2), num_objectives=2)
  with pytest.raises(ValueError, match="tau"):
    bloop_optax.pcd(1.5)
  with pytest.raises(TypeError, match="tau"):
    bloop_optax.pcd("0.1")
  with pytest.raises(ValueError, match="norm_decay"):
    bloop_optax.pcd(norm_decay=1.0)
  with pytest.raises(ValueError, match="num_objectives >= 2"):
    bloop_optax.pcd(num_objectives=1)
  with pytest.raises(TypeError, match="expected updates=MainAux"):
    tx.update(main, state)
