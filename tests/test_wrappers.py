"""Every row of the docs' table of optax wrappers and combinators around the
surgery (docs/optax_wrappers.md): where it goes, whether it works, what it does."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bloop_optax
from bloop_optax import MainAux

pytestmark = pytest.mark.optax_optimizer

PARAMS = {"w": jnp.array([1.0, -1.0, 0.5]), "b": jnp.array([0.2, 0.0])}


def pair(step):
  """A deterministic, step-dependent pair of gradients with a conflict."""
  t = jnp.float32(step)
  main = {"w": jnp.array([1.0, 2.0, 3.0]) + t, "b": jnp.array([1.0, -1.0]) * (1 + t)}
  aux = {"w": jnp.array([-3.0, 0.0, 1.0]) - t, "b": jnp.array([2.0, 2.0])}
  return MainAux(main, aux)


def run(tx, steps=4, params=PARAMS, grads=pair, **extra):
  state = tx.init(params)
  update = jax.jit(lambda g, s, p: tx.update(g, s, p, **extra))
  out = []
  for k in range(steps):
    updates, state = update(grads(k), state, params)
    out.append(updates)
  return out, state


def assert_close(a, b, rtol=1e-6, atol=1e-7):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def norm(tree):
  return jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree)))


def surgery():
  return bloop_optax.bloop(0.5, ema_decay=0.9)


def reference(steps=4):
  """Bloop's directions, then Adam applied to them: the chain, by hand."""
  after = optax.adam(1e-2)
  directions, _ = run(surgery(), steps)
  out, state = [], after.init(PARAMS)
  for d in directions:
    u, state = after.update(d, state, PARAMS)
    out.append(u)
  return out


def test_chain_and_named_chain():
  want = reference()
  got, _ = run(optax.chain(surgery(), optax.adam(1e-2)))
  named, state = run(optax.named_chain(("surgery", surgery()), ("adam", optax.adam(1e-2))))
  assert_close(got, want)
  assert_close(named, want)
  assert int(state["surgery"].steps) == 4


def test_inject_hyperparams_equals_the_factory_and_takes_changes():
  tx = optax.inject_hyperparams(bloop_optax.bloop)(aux_weight=0.5, ema_decay=0.9)
  got, state = run(tx)
  want, _ = run(surgery())
  assert_close(got, want)
  state.hyperparams["aux_weight"] = jnp.asarray(0.0)
  d, _ = tx.update(pair(4), state, PARAMS)
  assert_close(d, pair(4).main)  # aux_weight 0: the main gradient


def test_multisteps_fails_loudly_and_multi_steps_accumulates_the_pair():
  with pytest.raises((ValueError, TypeError)):
    run(optax.MultiSteps(optax.chain(surgery(), optax.sgd(1.0)), every_k_schedule=2))
  got, _ = run(bloop_optax.multi_steps(surgery(), every_k=2))
  mean = lambda a, b: jax.tree.map(lambda x, y: (x + y) / 2, a, b)
  want, _ = run(surgery(), steps=2, grads=lambda k: mean(pair(2 * k), pair(2 * k + 1)))
  assert_close(got[1], want[0])
  assert_close(got[3], want[1])
  assert_close(got[0], jax.tree.map(jnp.zeros_like, PARAMS))


def test_apply_if_finite_goes_after_the_surgery():
  with pytest.raises((ValueError, TypeError)):
    run(optax.apply_if_finite(optax.chain(surgery(), optax.adam(1e-2)), 3))

  def grads(k):
    g = pair(k)
    return MainAux(jax.tree.map(lambda x: x * jnp.nan, g.main), g.aux) if k == 2 else g

  tx = optax.chain(surgery(), optax.apply_if_finite(optax.adam(1e-2), 3))
  got, state = run(tx, steps=4, grads=grads)
  # The NaN step is rejected whole: zero update, Bloop's EMA untouched (counted),
  # and the next steps equal a run that never saw it.
  assert_close(got[2], jax.tree.map(jnp.zeros_like, PARAMS))
  assert int(state[0].skipped_steps) == 1 and int(state[1].total_notfinite) == 1
  clean, _ = run(tx, steps=3, grads=lambda k: pair(k if k < 2 else 3))
  assert_close(got[3], clean[2])


def test_masked_around_the_surgery_fails_and_its_alternatives():
  mask = {"w": True, "b": False}
  with pytest.raises((ValueError, TypeError)):
    run(optax.masked(surgery(), mask))
  # Masking AFTER the surgery: the update rule applies to some leaves only.
  got, _ = run(optax.chain(surgery(), optax.masked(optax.sgd(0.1), mask)))
  directions, _ = run(surgery())
  np.testing.assert_allclose(got[-1]["w"], -0.1 * directions[-1]["w"], rtol=1e-6)
  np.testing.assert_allclose(got[-1]["b"], directions[-1]["b"], rtol=1e-6)  # passed through
  # Surgery on some leaves only: partition, the rest taking the main gradient.
  labels = {"w": "surgery", "b": "plain"}
  got, _ = run(
    bloop_optax.partition({"surgery": surgery(), "plain": bloop_optax.mixed(0.0)}, labels)
  )
  only_w, _ = run(
    surgery(),
    params={"w": PARAMS["w"]},
    grads=lambda k: MainAux({"w": pair(k).main["w"]}, {"w": pair(k).aux["w"]}),
  )
  np.testing.assert_allclose(got[-1]["w"], only_w[-1]["w"], rtol=1e-6)
  np.testing.assert_allclose(got[-1]["b"], pair(3).main["b"], rtol=1e-6)


def test_multi_transform_fails_and_partition_replaces_it():
  labels = {"w": "a", "b": "c"}
  transforms = {"a": surgery(), "c": bloop_optax.mixed(0.5)}
  with pytest.raises((ValueError, TypeError)):
    run(optax.multi_transform(transforms, labels))
  got, _ = run(bloop_optax.partition(transforms, labels))
  g = pair(3)
  np.testing.assert_allclose(got[-1]["b"], g.main["b"] + 0.5 * g.aux["b"], rtol=1e-6)


def test_clip_by_global_norm_before_clips_the_joint_norm_of_the_pair():
  got, _ = run(optax.chain(optax.clip_by_global_norm(1.0), surgery()))
  scaled = lambda k: jax.tree.map(lambda x: x / norm(pair(k)), pair(k))
  want, _ = run(surgery(), grads=scaled)  # ||(M, A)|| > 1 at every step here
  assert_close(got, want, rtol=1e-5)


def test_clip_by_global_norm_after_clips_the_direction():
  got, _ = run(optax.chain(surgery(), optax.clip_by_global_norm(1.0)))
  directions, _ = run(surgery())
  for u, d in zip(got, directions, strict=True):
    assert_close(u, jax.tree.map(lambda x, d=d: x / norm(d), d), rtol=1e-5)


def test_reduce_on_plateau_after_the_surgery_takes_the_loss():
  tx = optax.chain(
    surgery(), optax.sgd(0.1), optax.contrib.reduce_on_plateau(patience=2, cooldown=0)
  )
  got, state = run(tx, steps=8, value=jnp.asarray(1.0))  # a loss that never improves
  assert float(state[-1].scale) < 1.0
  directions, _ = run(surgery(), steps=8)
  np.testing.assert_allclose(got[0]["w"], -0.1 * directions[0]["w"], rtol=1e-6)


def test_apply_every_after_the_surgery():
  got, _ = run(optax.chain(surgery(), optax.sgd(1.0), optax.apply_every(2)))
  directions, _ = run(surgery())
  assert_close(got[0], jax.tree.map(jnp.zeros_like, PARAMS))
  assert_close(got[1], jax.tree.map(lambda a, b: -(a + b), directions[0], directions[1]))


# A plain optax transform that receives the pair (placed before the surgery,
# around it, or given the pair by nnx.Optimizer) fails inside optax, before the
# package sees anything: optax's own pytree error, which names MainAux.
@pytest.mark.parametrize(
  "make",
  [
    lambda: optax.chain(optax.adam(1e-2), surgery()),
    lambda: optax.chain(optax.add_decayed_weights(1e-4), surgery()),
    lambda: optax.adam(1e-2),
  ],
  ids=["adam before the surgery", "add_decayed_weights before the surgery", "adam given the pair"],
)
def test_plain_transform_given_the_pair_fails_in_optax(make):
  with pytest.raises(ValueError, match="MainAux|named tuple"):  # jax < 0.6: "named tuple"
    run(make())


def test_weight_decay_after_the_surgery():
  got, _ = run(optax.chain(surgery(), optax.add_decayed_weights(1e-2), optax.sgd(0.1)))
  directions, _ = run(surgery())
  for u, d in zip(got, directions, strict=True):
    want = jax.tree.map(lambda x, p: -0.1 * (x + 1e-2 * p), d, PARAMS)
    assert_close(u, want, rtol=1e-6)


def test_nnx_optimizer_takes_the_pair_only_with_the_surgery_in_its_chain():
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  main = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  grads = MainAux(main, jax.tree.map(lambda x: -2 * x, main))
  plain = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  with pytest.raises(ValueError):
    plain.update(model, grads)
  chained = nnx.Optimizer(model, optax.chain(surgery(), optax.adam(1e-2)), wrt=nnx.Param)
  before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
  chained.update(model, grads)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), before, nnx.state(model))
  assert all(v > 0 for v in jax.tree.leaves(moved))


@pytest.mark.parametrize("where", ["after", "around"])
def test_lookahead_after_or_around_the_surgery(where):
  """optax.lookahead after the surgery hands the chain LookaheadParams(fast,
  slow); the surgery's state is shaped like the fast params it trains."""
  la = lambda inner: optax.lookahead(inner, sync_period=2, slow_step_size=0.5)
  tx = optax.chain(surgery(), la(optax.adam(1e-2)))
  if where == "around":
    tx = la(optax.chain(surgery(), optax.adam(1e-2)))
  lookahead_params = optax.LookaheadParams.init_synced(PARAMS)
  state = tx.init(lookahead_params)
  step = jax.jit(tx.update)
  # By hand: Bloop's directions, then lookahead(adam) on them.
  directions, _ = run(surgery(), steps=4)
  ref, ref_params = la(optax.adam(1e-2)), optax.LookaheadParams.init_synced(PARAMS)
  ref_state = ref.init(ref_params)
  for k in range(4):
    u, state = step(pair(k), state, lookahead_params)
    lookahead_params = optax.apply_updates(lookahead_params, u)
    v, ref_state = ref.update(directions[k], ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, v)
  assert_close(lookahead_params, ref_params, rtol=1e-5)
  assert not np.allclose(lookahead_params.slow["w"], PARAMS["w"])  # two syncs happened
