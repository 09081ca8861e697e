"""The compiled step adds no parameter-sized temporary (XLA's memory analysis).

Structural, not a timing: with donated params and optimizer state, a step of
chain(bloop, adam) must update the EMA in place and fuse the direction into
adam, so its temporaries stay far below one copy of the parameters.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import bloop_optax

# What XLA:CPU stores while it runs a step is a property of its version: from
# jaxlib 0.10 on the step below keeps no parameter-sized temporary; jaxlib 0.5
# to 0.9 plan up to two parameter-sized temporaries for the same program.
MEMORY_PLAN_JAX = (0, 10)
pytestmark = [
  pytest.mark.optax_optimizer,
  pytest.mark.skipif(
    tuple(int(v) for v in jax.__version__.split(".")[:2]) < MEMORY_PLAN_JAX,
    reason=f"XLA:CPU of jax {jax.__version__} plans extra temporaries for this step",
  ),
]


def temp_bytes(tx, takes_pair=True):
  params = {f"w{i}": jnp.ones((64, 256), jnp.float32) * (i + 1) for i in range(4)}
  grads = jax.tree.map(lambda p: p * 0.5, params)
  pair = bloop_optax.MainAux(grads, jax.tree.map(lambda g: -g, grads)) if takes_pair else grads

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), pair).compile()
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  return compiled.memory_analysis().temp_size_in_bytes, param_bytes


def test_bloop_step_has_no_parameter_sized_temporary():
  temp, param_bytes = temp_bytes(optax.chain(bloop_optax.bloop(0.1), optax.adam(1e-3)))
  assert temp < param_bytes / 16, (temp, param_bytes)


@pytest.mark.parametrize(
  "factory", [bloop_optax.mixed, bloop_optax.dynamic_barrier, bloop_optax.pcgrad_pair]
)
def test_baseline_steps_have_no_parameter_sized_temporary(factory):
  temp, param_bytes = temp_bytes(optax.chain(factory(0.1), optax.adam(1e-3)))
  assert temp < param_bytes / 16, (temp, param_bytes)


AGGREGATORS = ["mgda", "pcgrad", "cagrad", "imtl_g", "aligned_mtl", "upgrad", "dualproj", "config"]


@pytest.mark.parametrize(
  ("name", "ema_decay"),
  [(name, decay) for name in AGGREGATORS[:6] for decay in (None, 0.9)]
  + [(name, 0.9) for name in (*AGGREGATORS[6:], "krum", "nash_mtl", "gradvac", "moco", "cr_mogm")],
)
def test_aggregator_steps_have_no_parameter_sized_temporary(name, ema_decay):
  """Three objectives: the Gram matrix is scalars, the EMAs are written in
  place, and the weighted sum fuses into adam (CR-MOGM: the wrapped
  aggregator's unused direction is not computed)."""
  from bloop_optax import aggregators

  if name == "cr_mogm":
    agg_tx = aggregators.cr_mogm(aggregators.upgrad(3, ema_decay=ema_decay))
  else:
    agg_tx = getattr(aggregators, name)(3, ema_decay=ema_decay)
  tx = optax.chain(agg_tx, optax.adam(1e-3))
  params = {f"w{i}": jnp.ones((64, 256), jnp.float32) * (i + 1) for i in range(4)}
  grads = tuple(jax.tree.map(lambda p, s=s: p * s, params) for s in (0.5, -0.3, 0.2))

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), grads).compile()
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < param_bytes / 16, (temp, param_bytes)


def executed_words_per_param(tx, takes_pair=True):
  """XLA's cost-analysis bytes of one ordinary step, in float32 words per parameter
  (the overflow branch stubbed: it runs only when a float32 sum overflows)."""
  from benchmarks.speed import hlo_stats
  from benchmarks.speed import overflow_branch_stubbed

  params = {f"w{i}": jnp.ones((64 + i, 256), jnp.float32) for i in range(4)}
  count = sum(x.size for x in jax.tree.leaves(params))
  pair = bloop_optax.MainAux(params, params) if takes_pair else params

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  with overflow_branch_stubbed():
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), pair)
    return hlo_stats(lowered, count)["bytes_per_param"]


def test_step_moves_the_plain_formula_bytes_plus_the_guard():
  """The plain formula (tree_map EMA, vdot sums, no guard) moves 20 words per
  parameter on XLA:CPU; bloop adds exactly one read of M and A for <M, A>, whose
  finiteness guards the in-place EMA write; the opt-in cosine adds <M, M> and
  <A, A>. See docs/benchmarks/speed.md for the pass-by-pass account."""
  from benchmarks.speed import naive_bloop

  adam = lambda: optax.adam(1e-3)
  plain = executed_words_per_param(optax.chain(naive_bloop(0.1, 0.99), adam()))
  ours = executed_words_per_param(optax.chain(bloop_optax.bloop(0.1, ema_decay=0.99), adam()))
  cosine = executed_words_per_param(
    optax.chain(bloop_optax.bloop(0.1, ema_decay=0.99, track_cosine=True), adam())
  )
  mixed = executed_words_per_param(optax.chain(bloop_optax.mixed(0.1), adam()))
  assert plain == pytest.approx(20, abs=0.1)
  assert ours == pytest.approx(plain + 2, abs=0.1)
  assert cosine == pytest.approx(plain + 4, abs=0.1)
  assert mixed == pytest.approx(12, abs=0.1)
