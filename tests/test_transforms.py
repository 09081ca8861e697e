"""The transforms against SPEC.md: identities, a NumPy reference, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bloop_optax
from bloop_optax import MainAux
from tests import reference
from tests.helpers import STEPS
from tests.helpers import assert_close
from tests.helpers import enable_x64
from tests.helpers import flat
from tests.helpers import gradient_sequence
from tests.helpers import random_tree
from tests.helpers import run
from tests.helpers import steps_of
from tests.helpers import unflat
from tests.helpers import zeros_params

pytestmark = pytest.mark.usefixtures("strict_dtype_promotion")


ORDERS = ("update_first", "project_first")


# ---------------------------------------------------------------- helpers


# ---------------------------------------------------------------- differential


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("beta", [0.0, 0.9, 0.99])
@pytest.mark.parametrize("lam", [0.3, 2.0])
def test_bloop_matches_numpy_reference(order, beta, lam):
  mains, auxs = gradient_sequence(seed=1)
  directions, states = run(
    bloop_optax.bloop(lam, ema_decay=beta, ema_order=order, track_cosine=True),
    mains,
    auxs,
    zeros_params(),
  )
  ms, as_ = steps_of(mains), steps_of(auxs)
  ref_d, ref_e, ref_r = reference.bloop(ms, as_, lam, beta, order)
  for t, (d, e) in enumerate(zip(steps_of(directions), steps_of(states.main_ema), strict=True)):
    assert_close(d, ref_d[t], rtol=1e-4, atol=1e-4)
    assert_close(e, ref_e[t], rtol=1e-4, atol=1e-5)
  assert_close(states.proj_coef, ref_r, rtol=1e-4, atol=1e-5)
  cos = [reference.cosine(m, a) for m, a in zip(ms, as_, strict=True)]
  assert_close(states.cos_main_aux, cos, rtol=1e-4, atol=1e-5)
  assert states.steps[-1] == STEPS and states.skipped_steps[-1] == 0


@pytest.mark.parametrize(
  "factory, formula",
  [
    (bloop_optax.mixed, reference.mixed),
    (bloop_optax.dynamic_barrier, reference.dynamic_barrier),
    (bloop_optax.pcgrad_pair, reference.pcgrad),
  ],
)
@pytest.mark.parametrize("lam", [0.0, 0.3, 2.0])
def test_baselines_match_numpy_reference(factory, formula, lam):
  mains, auxs = gradient_sequence(seed=2)
  directions, _ = run(factory(lam), mains, auxs, zeros_params())
  for d, m, a in zip(steps_of(directions), steps_of(mains), steps_of(auxs), strict=True):
    assert_close(d, formula(m, a, lam), rtol=1e-4, atol=1e-4)


def test_the_sequence_exercises_both_branches():
  """Guards the differential tests above: both signs of <M, A> occur."""
  ms, as_ = (steps_of(x) for x in gradient_sequence(seed=2))
  dots = np.array([m @ a for m, a in zip(ms, as_, strict=True)])
  rs = dots / np.array([m @ m for m in ms])
  assert (dots < 0).sum() >= 20 and (dots > 0).sum() >= 5
  assert (2.0 * rs > 1).any() or (rs < 0).any()


# ---------------------------------------------------------------- identities


@pytest.mark.parametrize("order", ORDERS)
def test_zero_aux_weight_gives_main(order):
  """lambda = 0 gives D = M (PCGrad excepted: it still projects M off A)."""
  mains, auxs = gradient_sequence(seed=3, steps=10)
  for tx in [
    bloop_optax.bloop(0.0, ema_decay=0.9, ema_order=order),
    bloop_optax.mixed(0.0),
    bloop_optax.dynamic_barrier(0.0),
  ]:
    directions, _ = run(tx, mains, auxs, zeros_params())
    for got, want in zip(steps_of(directions), steps_of(mains), strict=True):
      np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("order", ORDERS)
def test_added_part_is_orthogonal_to_projection_vector(order):
  mains, auxs = gradient_sequence(seed=4)
  directions, states = run(
    bloop_optax.bloop(1.5, ema_decay=0.9, ema_order=order), mains, auxs, zeros_params()
  )
  ds, ms = steps_of(directions), steps_of(mains)
  emas = steps_of(states.main_ema)
  for t in range(STEPS):
    if order == "update_first":
      p = emas[t]  # P = E'
    else:
      p = emas[t - 1] if t else ms[0]  # P = E, or M at the first step
    added = ds[t] - ms[t]
    assert abs(added @ p) <= 1e-5 * np.linalg.norm(added) * np.linalg.norm(p)
    assert np.linalg.norm(added) > 1e-3  # the check is not vacuous


def test_zero_decay_is_projection_on_the_batch_gradient():
  mains, auxs = gradient_sequence(seed=5)
  lam = 0.7
  directions, _ = run(bloop_optax.bloop(lam, ema_decay=0.0), mains, auxs, zeros_params())
  for d, m, a in zip(steps_of(directions), steps_of(mains), steps_of(auxs), strict=True):
    assert_close(d, m + lam * reference.project_out(a, m), rtol=1e-4, atol=1e-4)


def test_zero_decay_bloop_equals_dynamic_barrier_when_unclipped():
  """DB is the no-EMA projection whenever lambda r <= 1 (SPEC)."""
  rng = np.random.default_rng(6)
  params = zeros_params()
  checked = 0
  lam = 0.5
  db_tx, bl_tx = bloop_optax.dynamic_barrier(lam), bloop_optax.bloop(lam, ema_decay=0.0)
  db_update, bl_update = jax.jit(db_tx.update), jax.jit(bl_tx.update)  # one compilation each
  for _ in range(20):
    m, a = random_tree(rng), random_tree(rng)
    r = flat(m) @ flat(a) / (flat(m) @ flat(m))
    if lam * r > 1:
      continue
    checked += 1
    db, _ = db_update(MainAux(m, a), db_tx.init(params), params)
    bl, _ = bl_update(MainAux(m, a), bl_tx.init(params), params)
    assert_close(flat(db), flat(bl), rtol=1e-5, atol=1e-5)
  assert checked >= 10


def test_dynamic_barrier_is_the_clipped_projection():
  m = {"w": jnp.array([1.0, 0.0, 0.0])}
  a = {"w": jnp.array([3.0, 1.0, 0.0])}  # r = 3
  for lam in [0.1, 1 / 3, 0.5, 2.0]:
    d, _ = jax.jit(bloop_optax.dynamic_barrier(lam).update)(
      MainAux(m, a), bloop_optax.dynamic_barrier(lam).init(m)
    )
    r = 3.0
    clipped = flat(m) + lam * (flat(a) - min(r, 1 / lam) * flat(m))
    assert_close(flat(d), clipped, rtol=1e-6, atol=1e-6)
  # lambda r = 6 > 1: the main term is dropped entirely.
  assert_close(flat(d), 2.0 * flat(a), rtol=1e-6, atol=1e-6)


def test_pcgrad_branches():
  m = {"w": jnp.array([1.0, 0.0])}
  tx = bloop_optax.pcgrad_pair(0.5)
  agree = {"w": jnp.array([1.0, 2.0])}
  d, _ = tx.update(MainAux(m, agree), tx.init(m))
  assert_close(flat(d), [1.5, 1.0])  # M + lambda A
  conflict = {"w": jnp.array([-1.0, 1.0])}
  d, _ = tx.update(MainAux(m, conflict), tx.init(m))
  # pi(M; A) = [0.5, 0.5]; pi(A; M) = [0, 1]; D = [0.5, 0.5] + 0.5 [0, 1].
  assert_close(flat(d), [0.5, 1.0])
  assert flat(d) @ flat(m) > 0 and flat(d) @ flat(conflict) > 0


def test_projection_is_global_not_per_leaf():
  """A case where per-leaf projections differ from the global one."""
  m = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([0.0, 1.0])}
  aux = {"a": jnp.array([1.0, 1.0]), "b": jnp.array([-3.0, -1.0])}
  tx = bloop_optax.bloop(1.0, ema_decay=0.0)
  d, state = jax.jit(tx.update)(MainAux(m, aux), tx.init(m))
  fm, fa = flat(m), flat(aux)
  global_d = fm + reference.project_out(fa, fm)
  per_leaf = np.concatenate(
    [flat(m[k]) + reference.project_out(flat(aux[k]), flat(m[k])) for k in "ab"]
  )
  assert np.abs(global_d - per_leaf).max() > 0.5
  assert_close(flat(d), global_d, rtol=1e-6, atol=1e-6)
  assert_close(state.proj_coef, (fm @ fa) / (fm @ fm))


def test_zero_gradients_give_zero_coefficients():
  zero = zeros_params()
  a = random_tree(np.random.default_rng(7))
  for tx in [
    bloop_optax.bloop(0.5, track_cosine=True),
    bloop_optax.dynamic_barrier(0.5),
    bloop_optax.pcgrad_pair(0.5),
  ]:
    d, state = jax.jit(tx.update)(MainAux(zero, a), tx.init(zero), zero)
    assert_close(flat(d), 0.5 * flat(a), rtol=1e-6, atol=1e-6)
    assert float(state.cos_main_aux) == 0.0 and float(state.proj_coef) == 0.0


# ---------------------------------------------------------------- with optax


@pytest.mark.optax_optimizer
def test_chain_with_adam_equals_adam_on_reference_direction():
  mains, auxs = gradient_sequence(seed=8)
  params = zeros_params()
  lam, beta = 0.8, 0.9
  updates, _ = run(
    optax.chain(bloop_optax.bloop(lam, ema_decay=beta), optax.adam(1e-2)), mains, auxs, params
  )
  ref_d, _, _ = reference.bloop(steps_of(mains), steps_of(auxs), lam, beta)
  ref_tree = jax.tree.map(
    lambda *xs: jnp.stack(xs), *[unflat(np.float32(d), params) for d in ref_d]
  )
  adam_updates, _ = run(
    optax.GradientTransformationExtraArgs(
      optax.adam(1e-2).init, lambda u, s, p=None: optax.adam(1e-2).update(u.main, s, p)
    ),
    ref_tree,
    ref_tree,
    params,
  )
  for got, want in zip(steps_of(updates), steps_of(adam_updates), strict=True):
    assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_aux_weight_schedules():
  mains, auxs = gradient_sequence(seed=9, steps=20)
  schedule = optax.linear_schedule(0.0, 2.0, transition_steps=19)
  lams = [float(schedule(t)) for t in range(20)]
  ref_d, _, _ = reference.bloop(steps_of(mains), steps_of(auxs), None, 0.9, lams=lams)
  params = zeros_params()
  via_factory, _ = run(bloop_optax.bloop(schedule, ema_decay=0.9), mains, auxs, params)
  injected = optax.inject_hyperparams(bloop_optax.bloop)(aux_weight=schedule, ema_decay=0.9)
  via_inject, states = run(injected, mains, auxs, params)
  for a, b, want in zip(steps_of(via_factory), steps_of(via_inject), ref_d, strict=True):
    assert_close(a, want, rtol=1e-4, atol=1e-4)
    assert_close(b, want, rtol=1e-4, atol=1e-4)
  assert_close(states.hyperparams["aux_weight"], lams, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
  "factory", [bloop_optax.mixed, bloop_optax.dynamic_barrier, bloop_optax.pcgrad_pair]
)
def test_baselines_accept_schedules_and_inject_hyperparams(factory):
  mains, auxs = gradient_sequence(seed=10, steps=5)
  schedule = lambda count: 0.5 * count.astype(jnp.float32)
  d1, _ = run(factory(schedule), mains, auxs, zeros_params())
  d2, _ = run(optax.inject_hyperparams(factory)(aux_weight=schedule), mains, auxs, zeros_params())
  ms, as_ = steps_of(mains), steps_of(auxs)
  formula = {
    bloop_optax.mixed: reference.mixed,
    bloop_optax.dynamic_barrier: reference.dynamic_barrier,
    bloop_optax.pcgrad_pair: reference.pcgrad,
  }[factory]
  for t, (a, b) in enumerate(zip(steps_of(d1), steps_of(d2), strict=True)):
    want = formula(ms[t], as_[t], 0.5 * t)
    assert_close(a, want, rtol=1e-4, atol=1e-4)
    assert_close(b, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", ["MainAux", "tuple", "list", "mapping", "named mapping"])
def test_accepted_pair_forms(form):
  rng = np.random.default_rng(11)
  m, a = random_tree(rng), random_tree(rng)
  pair = {
    "MainAux": MainAux(m, a),
    "tuple": (m, a),
    "list": [m, a],
    "mapping": {0: m, 1: a},
    "named mapping": {"main": m, "aux": a},
  }[form]
  tx = bloop_optax.bloop(0.5, ema_decay=0.0)
  d, _ = jax.jit(tx.update)(pair, tx.init(m))
  assert jax.tree.structure(d) == jax.tree.structure(m)
  assert_close(flat(d), flat(m) + 0.5 * reference.project_out(flat(a), flat(m)), 1e-5, 1e-5)


# ---------------------------------------------------------------- dtypes


def test_bfloat16_gradients_keep_their_dtype_and_a_float32_ema():
  mains, auxs = gradient_sequence(seed=12, steps=30, dtype=jnp.bfloat16)
  params = zeros_params(jnp.bfloat16)
  tx = bloop_optax.bloop(0.5, ema_decay=0.9)
  state0 = tx.init(params)
  directions, states = run(tx, mains, auxs, params)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(directions))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(states.main_ema))
  # lax.scan already requires a stable state; check the dtypes explicitly too.
  dtypes = lambda tree: [x.dtype for x in jax.tree.leaves(tree)]
  last = jax.tree.map(lambda x: x[-1], states)
  assert dtypes(last) == dtypes(state0)
  ref_d, _, _ = reference.bloop(steps_of(mains), steps_of(auxs), 0.5, 0.9)
  for got, want in zip(steps_of(directions), ref_d, strict=True):
    assert_close(got, want, rtol=2e-2, atol=3e-2)  # bfloat16 output rounding


@pytest.mark.parametrize(
  "factory", [bloop_optax.mixed, bloop_optax.dynamic_barrier, bloop_optax.pcgrad_pair]
)
def test_baselines_keep_bfloat16(factory):
  mains, auxs = gradient_sequence(seed=13, steps=3, dtype=jnp.bfloat16)
  directions, _ = run(factory(0.5), mains, auxs, zeros_params(jnp.bfloat16))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(directions))


def test_cosine_is_opt_in():
  mains, auxs = gradient_sequence(seed=15, steps=3)
  d_off, s_off = run(bloop_optax.bloop(0.5), mains, auxs, zeros_params())
  d_on, s_on = run(bloop_optax.bloop(0.5, track_cosine=True), mains, auxs, zeros_params())
  assert s_off.cos_main_aux is None and s_on.cos_main_aux.shape == (3,)
  # The flag changes nothing else, to rounding: the two programs fuse differently
  # (one float32 ulp apart in a few entries with some XLA versions).
  for got, want in zip(steps_of(d_off), steps_of(d_on), strict=True):
    np.testing.assert_allclose(got, want, rtol=2e-7, atol=1e-7)


def test_accumulator_dtype_option():
  mains, auxs = gradient_sequence(seed=14, steps=5)
  _, states = run(
    bloop_optax.bloop(0.5, accumulator_dtype=jnp.bfloat16, track_cosine=True),
    mains,
    auxs,
    zeros_params(),
  )
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(states.main_ema))
  assert states.cos_main_aux.dtype == jnp.float32 and states.proj_coef.dtype == jnp.float32


def test_float64_params_keep_a_float64_ema():
  with enable_x64():
    params = {"w": jnp.zeros(3, jnp.float64)}
    state = bloop_optax.bloop().init(params)
    assert state.main_ema["w"].dtype == jnp.float64
    m, a = {"w": jnp.array([1.0, 2.0, 3.0])}, {"w": jnp.array([0.0, 1.0, -1.0])}
    d, state = jax.jit(bloop_optax.bloop(1.0, ema_decay=0.0).update)(MainAux(m, a), state)
    assert d["w"].dtype == jnp.float64 and state.main_ema["w"].dtype == jnp.float64


# ---------------------------------------------------------------- non-finite


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_step_never_enters_the_ema(order, bad):
  mains, auxs = gradient_sequence(seed=15, steps=12)
  # Poison step 0 (no EMA yet) in main and step 6 in aux.
  mains = jax.tree.map(lambda x: x.at[0].set(bad), mains)
  auxs = jax.tree.map(lambda x: x.at[6].set(bad), auxs)
  directions, states = run(
    bloop_optax.bloop(0.5, ema_decay=0.9, ema_order=order), mains, auxs, zeros_params()
  )
  ms, as_ = steps_of(mains), steps_of(auxs)
  ref_d, ref_e, _ = reference.bloop(ms, as_, 0.5, 0.9, order)
  emas = steps_of(states.main_ema)
  assert np.all(emas[0] == 0)  # untouched at the poisoned first step
  np.testing.assert_array_equal(emas[6], emas[5])  # untouched at step 6
  assert np.all(np.isfinite(np.stack(emas)))
  for t in range(12):
    assert_close(emas[t], ref_e[t], rtol=1e-4, atol=1e-5)
    if t not in (0, 6):
      assert_close(steps_of(directions)[t], ref_d[t], rtol=1e-4, atol=1e-4)
  # The output passes through, so a downstream apply_if_finite can skip it.
  assert not np.all(np.isfinite(steps_of(directions)[6]))
  assert list(np.asarray(states.skipped_steps)) == [1] * 6 + [2] * 6


# ---------------------------------------------------------------- bad input


def test_non_pair_updates_raise():
  m = {"w": jnp.ones(3)}
  tx = bloop_optax.bloop()
  with pytest.raises(TypeError, match=r"expected updates=MainAux.*got a dict"):
    tx.update(m, tx.init(m))
  with pytest.raises(TypeError, match=r"got a tuple of length 3"):
    tx.update((m, m, m), tx.init(m))
  with pytest.raises(TypeError, match=r"mapping with keys 0 and 1, or 'main' and 'aux'"):
    bloop_optax.pcgrad_pair(1.0).update(
      {"main": m, "extra": m}, bloop_optax.pcgrad_pair(1.0).init(m)
    )


@pytest.mark.parametrize("factory", [bloop_optax.bloop, bloop_optax.mixed, bloop_optax.pcgrad_pair])
def test_mismatched_halves_raise_with_key_path(factory):
  m = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
  tx = factory(0.1)
  state = tx.init(m)
  with pytest.raises(ValueError, match=r"\['b'\]: shape \(2, 2\) vs \(4,\)"):
    tx.update(MainAux(m, {"a": jnp.ones(3), "b": jnp.ones(4)}), state, m)
  with pytest.raises(ValueError, match=r"key path \['b'\] vs \['c'\]"):
    tx.update(MainAux(m, {"a": jnp.ones(3), "c": jnp.ones((2, 2))}), state, m)


def test_halves_not_matching_init_params_raise():
  params = {"a": jnp.ones(3)}
  tx = bloop_optax.bloop()
  state = tx.init(params)
  grads = {"a": jnp.ones(5)}
  with pytest.raises(ValueError, match=r"params given to init.*shape \(5,\) vs \(3,\)"):
    jax.jit(tx.update)(MainAux(grads, grads), state)
  with pytest.raises(ValueError, match=r"params given to init"):
    mixed = bloop_optax.mixed(0.1)
    mixed.update(MainAux(grads, grads), mixed.init(params), params)


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf])
@pytest.mark.parametrize(
  "factory",
  [
    bloop_optax.bloop,
    bloop_optax.mixed,
    bloop_optax.dynamic_barrier,
    bloop_optax.pcgrad_pair,
  ],
)
def test_bad_aux_weight_raises(factory, bad):
  with pytest.raises(
    ValueError, match=rf"expected aux_weight to be a finite number >= 0.*got {bad}"
  ):
    factory(bad)


@pytest.mark.parametrize("bad", [-0.01, 1.5])
def test_bad_ema_decay_raises(bad):
  with pytest.raises(
    ValueError, match=rf"expected ema_decay in \[0, 1\].*rho = 1 - ema_decay.*got {bad}"
  ):
    bloop_optax.bloop(ema_decay=bad)
  with pytest.raises(TypeError, match="inject_hyperparams"):
    bloop_optax.bloop(ema_decay=lambda count: 0.9)


def test_unknown_ema_order_raises():
  with pytest.raises(
    ValueError,
    match=r"expected ema_order in \('update_first', 'project_first'\); got 'paper'",
  ):
    bloop_optax.bloop(ema_order="paper")


def test_traced_hyperparameters_are_not_range_checked():
  """Values reaching the factory under inject_hyperparams are arrays."""
  tx = optax.inject_hyperparams(bloop_optax.bloop)(aux_weight=0.5, ema_decay=0.9)
  m = {"w": jnp.ones(2)}
  d, _ = jax.jit(tx.update)(MainAux(m, m), tx.init(m))
  assert_close(flat(d), flat(m))  # A parallel to M: nothing is added.
