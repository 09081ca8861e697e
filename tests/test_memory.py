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

pytestmark = pytest.mark.optax_optimizer


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
  "factory", [bloop_optax.mixed, bloop_optax.dynamic_barrier, bloop_optax.pcgrad]
)
def test_baseline_steps_have_no_parameter_sized_temporary(factory):
  temp, param_bytes = temp_bytes(optax.chain(factory(0.1), optax.adam(1e-3)))
  assert temp < param_bytes / 16, (temp, param_bytes)
