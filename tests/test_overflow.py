"""Huge finite gradients: every transform gives the exact direction.

Float32 (and bfloat16, which has float32's exponent range) sums of squares
overflow for norms above about 1.8e19. The transforms must then still return
the direction of the formula (checked against a float64 NumPy reference), keep
a finite state, and count no skipped step; NaN and Inf inputs must still be
told apart from such overflows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bloop_optax
from bloop_optax import MainAux
from tests import reference
from tests.helpers import flat
from tests.helpers import gradient_sequence
from tests.helpers import run
from tests.helpers import steps_of
from tests.helpers import zeros_params

NORMS = [1e20, 1e30]
DTYPES = [jnp.float32, jnp.bfloat16]
STEPS = 8


def huge_sequence(norm, dtype, seed=21):
  """Stacked (main, aux) steps scaled so that each main gradient has norm ~``norm``."""
  mains, auxs = gradient_sequence(seed, steps=STEPS)
  size = np.sqrt(sum(x[0].size for x in jax.tree.leaves(mains)))
  scale = norm / size
  cast = lambda t: jax.tree.map(lambda x: (x * scale).astype(dtype), t)
  return cast(mains), cast(auxs)


def rel_error(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / np.linalg.norm(want)


def expected(want, dtype):
  """The float64 reference as the transform can return it: in ``dtype``."""
  return np.asarray(jnp.asarray(want, jnp.float32).astype(dtype), np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("order", ["update_first", "project_first"])
def test_bloop_is_exact_at_huge_norms(order, norm, dtype):
  mains, auxs = huge_sequence(norm, dtype)
  directions, states = run(
    bloop_optax.bloop(0.7, ema_decay=0.9, ema_order=order, track_cosine=True),
    mains,
    auxs,
    zeros_params(dtype),
  )
  ms, as_ = steps_of(mains), steps_of(auxs)
  assert np.linalg.norm(ms[0]) > 1e19  # the float32 sums do overflow
  ref_d, ref_e, ref_r = reference.bloop(ms, as_, 0.7, 0.9, order)
  for t, (d, e) in enumerate(zip(steps_of(directions), steps_of(states.main_ema), strict=True)):
    assert rel_error(d, expected(ref_d[t], dtype)) < 1e-3, t
    assert np.all(np.isfinite(e)) and rel_error(e, ref_e[t]) < 1e-3, t
  np.testing.assert_allclose(states.proj_coef, ref_r, rtol=1e-3)
  cos = [reference.cosine(m, a) for m, a in zip(ms, as_, strict=True)]
  np.testing.assert_allclose(states.cos_main_aux, cos, rtol=1e-3, atol=1e-6)
  assert int(states.skipped_steps[-1]) == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize(
  "factory, formula",
  [
    (bloop_optax.dynamic_barrier, reference.dynamic_barrier),
    (bloop_optax.pcgrad_pair, reference.pcgrad),
  ],
)
def test_baselines_are_exact_at_huge_norms(factory, formula, norm, dtype):
  mains, auxs = huge_sequence(norm, dtype)
  directions, states = run(factory(0.7), mains, auxs, zeros_params(dtype))
  ms, as_ = steps_of(mains), steps_of(auxs)
  for t, d in enumerate(steps_of(directions)):
    assert rel_error(d, expected(formula(ms[t], as_[t], 0.7), dtype)) < 1e-3, t
  cos = [reference.cosine(m, a) for m, a in zip(ms, as_, strict=True)]
  np.testing.assert_allclose(states.cos_main_aux, cos, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", NORMS)
def test_hierarchical_bloop_is_exact_at_huge_norms(norm, dtype):
  mains, aux1 = huge_sequence(norm, dtype)
  _, aux2 = huge_sequence(norm / 1e5, dtype, seed=22)  # levels of very different scales
  tx = bloop_optax.hierarchical_bloop((0.5, 0.3), ema_decay=0.9)
  params = zeros_params(dtype)

  @jax.jit
  def scan(xs):
    def step(state, grads):
      d, state = tx.update(grads, state, params)
      return state, (d, state)

    return jax.lax.scan(step, tx.init(params), xs)[1]

  directions, states = scan((mains, aux1, aux2))
  ms, a1, a2 = steps_of(mains), steps_of(aux1), steps_of(aux2)
  ref_d, _ = reference.hierarchical_bloop(ms, [a1, a2], (0.5, 0.3), 0.9)
  for t, d in enumerate(steps_of(directions)):
    assert rel_error(d, expected(ref_d[t], dtype)) < 1e-3, t
  for ema in states.level_emas:
    assert all(np.all(np.isfinite(e)) for e in steps_of(ema))
  assert int(states.skipped_steps[-1]) == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("which", ["main", "aux"])
def test_nonfinite_huge_step_is_still_skipped(bad, which):
  """A NaN or an Inf among huge finite entries is not mistaken for an overflow."""
  mains, auxs = huge_sequence(1e30, jnp.float32)
  m = jax.tree.map(lambda x: x[0], mains)
  a = jax.tree.map(lambda x: x[0], auxs)
  poison = lambda t: jax.tree.map(lambda x: x.at[..., 0].set(bad) if x.ndim else x, t)
  m, a = (poison(m), a) if which == "main" else (m, poison(a))
  for tx in [
    bloop_optax.bloop(0.5),
    bloop_optax.bloop(0.5, ema_order="project_first"),
    bloop_optax.hierarchical_bloop((0.5,)),
  ]:
    state = tx.init(zeros_params())
    d, new_state = jax.jit(tx.update)(MainAux(m, a), state)
    assert not np.all(np.isfinite(flat(d)))  # loudly non-finite, for apply_if_finite
    assert int(new_state.skipped_steps) == 1
    emas = new_state.main_ema if hasattr(new_state, "main_ema") else new_state.level_emas
    assert all(np.all(np.asarray(e) == 0) for e in jax.tree.leaves(emas))
