"""Hierarchical Bloop (paper 2.3) against a NumPy Gram-Schmidt reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bloop_optax
from tests import reference
from tests.helpers import assert_close
from tests.helpers import gradient_sequence
from tests.helpers import random_tree
from tests.helpers import steps_of
from tests.helpers import zeros_params

STEPS = 40

pytestmark = pytest.mark.usefixtures("strict_dtype_promotion")


def three_objectives(seed):
  mains, aux1 = gradient_sequence(seed)
  _, aux2 = gradient_sequence(seed + 100)
  # Make aux_2 partly aligned with aux_1 so that the hierarchy matters.
  aux2 = jax.tree.map(lambda a, b: 0.5 * a + b, aux1, aux2)
  return mains, aux1, aux2


def run(tx, *stacked):
  params = zeros_params()

  @jax.jit
  def scan(state, xs):
    def step(state, grads):
      d, state = tx.update(grads, state, params)
      return state, (d, state)

    return jax.lax.scan(step, state, xs)

  return scan(tx.init(params), tuple(stacked))[1]


@pytest.mark.parametrize("beta", [0.0, 0.9])
def test_matches_numpy_reference(beta):
  mains, aux1, aux2 = three_objectives(1)
  lams = (0.7, 2.0)
  directions, states = run(bloop_optax.hierarchical_bloop(lams, ema_decay=beta), mains, aux1, aux2)
  ref_d, _ = reference.hierarchical_bloop(
    steps_of(mains)[:STEPS], [steps_of(aux1)[:STEPS], steps_of(aux2)[:STEPS]], lams, beta
  )
  for got, want in zip(steps_of(directions)[:STEPS], ref_d, strict=True):
    assert_close(got, want, rtol=2e-4, atol=2e-4)
  assert int(states.steps[-1]) == len(steps_of(mains))


def test_each_added_part_is_orthogonal_to_every_ema_above_it():
  mains, aux1, aux2 = three_objectives(2)
  lams = (1.0, 1.0)
  tx2 = bloop_optax.hierarchical_bloop(lams, ema_decay=0.9)
  d2, states = run(tx2, mains, aux1, aux2)
  tx1 = bloop_optax.hierarchical_bloop(lams[:1], ema_decay=0.9)
  d1, _ = run(tx1, mains, aux1)
  e_main = steps_of(states.level_emas[0])
  e_aux1 = steps_of(states.level_emas[1])
  for t, (full, first, m) in enumerate(
    zip(steps_of(d2), steps_of(d1), steps_of(mains), strict=True)
  ):
    part1, part2 = first - m, full - first  # the aux_1 part, then the aux_2 part
    for part, above in ((part1, [e_main[t]]), (part2, [e_main[t], e_aux1[t]])):
      for e in above:
        assert abs(part @ e) <= 2e-5 * np.linalg.norm(part) * np.linalg.norm(e)
      assert np.linalg.norm(part) > 1e-3


@pytest.mark.parametrize("beta", [0.0, 0.9, 0.99])
def test_one_aux_loss_equals_bloop(beta):
  mains, aux1 = gradient_sequence(3)
  d_h, s_h = run(bloop_optax.hierarchical_bloop((0.8,), ema_decay=beta), mains, aux1)
  d_b, s_b = run(bloop_optax.bloop(0.8, ema_decay=beta, track_cosine=True), mains, aux1)
  for got, want in zip(steps_of(d_h), steps_of(d_b), strict=True):
    assert_close(got, want, rtol=1e-5, atol=1e-5)
  assert_close(steps_of(s_h.level_emas[0])[-1], steps_of(s_b.main_ema)[-1], 1e-6, 1e-6)
  assert_close(s_h.cos_main_aux[:, 0], np.asarray(s_b.cos_main_aux), 1e-5, 1e-6)


def test_an_ema_in_the_span_above_contributes_nothing():
  """aux_1 parallel to main: Q_1 vanishes, and aux_2 is projected off M only."""
  m = {"w": jnp.array([1.0, 0.0, 0.0])}
  a1 = {"w": jnp.array([2.0, 0.0, 0.0])}
  a2 = {"w": jnp.array([1.0, 1.0, 1.0])}
  tx = bloop_optax.hierarchical_bloop((1.0, 1.0), ema_decay=0.0)
  d, _ = jax.jit(tx.update)((m, a1, a2), tx.init(m))
  np.testing.assert_allclose(d["w"], [1.0, 1.0, 1.0], atol=1e-6)


def test_nonfinite_step_leaves_every_ema_untouched():
  mains, aux1, aux2 = three_objectives(4)
  aux2 = jax.tree.map(lambda x: x.at[5].set(jnp.nan), aux2)
  _, states = run(bloop_optax.hierarchical_bloop((0.5, 0.5), ema_decay=0.9), mains, aux1, aux2)
  for ema in states.level_emas:
    np.testing.assert_array_equal(steps_of(ema)[5], steps_of(ema)[4])
    assert np.isfinite(np.stack(steps_of(ema))).all()
  assert int(states.skipped_steps[-1]) == 1


def test_bad_input():
  m = random_tree(np.random.default_rng(0))
  tx = bloop_optax.hierarchical_bloop((0.1, 0.2))
  state = tx.init(m)
  with pytest.raises(
    TypeError, match=r"a tuple of 3 pytrees \(one more than aux_weights\).*length 2"
  ):
    tx.update((m, m), state)
  bad = {**m, "vec": jnp.ones(3)}
  with pytest.raises(
    ValueError, match=r"main_grads and aux_grads_2.*\['vec'\]: shape \(7,\) vs \(3,\)"
  ):
    tx.update((m, m, bad), state)
  with pytest.raises(ValueError, match="at least one aux weight"):
    bloop_optax.hierarchical_bloop(())
  with pytest.raises(TypeError, match="expected aux_weights to be a sequence"):
    bloop_optax.hierarchical_bloop(0.5)
  with pytest.raises(ValueError, match=r"aux_weights\[1\] to be a finite number >= 0.*-1"):
    bloop_optax.hierarchical_bloop((0.1, -1.0))
