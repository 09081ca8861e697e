"""Per-group surgery with bloop_optax.partition."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bloop_optax
from bloop_optax import MainAux
from tests import reference
from tests.helpers import flat


def multitask_tree(rng):
  t = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return {"trunk": {"w": t(4, 3), "b": t(3)}, "main_head": t(3), "aux_head": t(3)}


def labels(params):
  def group(name, subtree):
    label = "trunk" if name == "trunk" else "head"
    return jax.tree.map(lambda _: label, subtree)

  return {k: group(k, v) for k, v in params.items()}


def test_projection_runs_over_each_group_alone():
  rng = np.random.default_rng(0)
  m, a = multitask_tree(rng), multitask_tree(rng)
  lam = 0.7
  tx = bloop_optax.partition(
    {"trunk": bloop_optax.bloop(lam, ema_decay=0.0), "head": bloop_optax.mixed(lam)}, labels
  )
  d, state = jax.jit(tx.update)(MainAux(m, a), tx.init(m), m)
  trunk = flat(m["trunk"]) + lam * reference.project_out(flat(a["trunk"]), flat(m["trunk"]))
  np.testing.assert_allclose(flat(d["trunk"]), trunk, rtol=1e-5, atol=1e-5)
  for head in ("main_head", "aux_head"):
    np.testing.assert_allclose(d[head], m[head] + lam * a[head], rtol=1e-6)
  # Differs from the global projection: the grouping matters here.
  glob, _ = bloop_optax.bloop(lam, ema_decay=0.0).update(
    MainAux(m, a), bloop_optax.bloop(lam, ema_decay=0.0).init(m)
  )
  assert np.abs(flat(glob) - flat(d)).max() > 1e-2
  ema = state.inner_states["trunk"].main_ema  # only the trunk's leaves are averaged
  assert isinstance(ema["main_head"], optax.MaskedNode)
  assert isinstance(ema["aux_head"], optax.MaskedNode)
  np.testing.assert_allclose(flat(ema["trunk"]), flat(m["trunk"]), rtol=1e-6)


@pytest.mark.optax_optimizer
def test_partition_in_a_chain_under_scan():
  rng = np.random.default_rng(1)
  params = multitask_tree(rng)
  tx = optax.chain(
    bloop_optax.partition(
      {"trunk": bloop_optax.bloop(0.5, ema_decay=0.9), "head": bloop_optax.mixed(0.5)}, labels
    ),
    optax.adam(1e-2),
  )
  steps = [MainAux(multitask_tree(rng), multitask_tree(rng)) for _ in range(5)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *steps)

  def body(carry, g):
    p, s = carry
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  (p, s), _ = jax.jit(lambda c, xs: jax.lax.scan(body, c, xs))((params, tx.init(params)), stacked)
  ema = s[0].inner_states["trunk"].main_ema
  assert set(ema) == {"trunk", "main_head", "aux_head"}  # heads masked out
  assert float(bloop_optax.tree_dot(ema["trunk"], ema["trunk"])) > 0
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(p))


def test_partition_bad_labels():
  m = multitask_tree(np.random.default_rng(2))
  tx = bloop_optax.partition({"trunk": bloop_optax.bloop()}, labels)
  with pytest.raises(ValueError, match=r"every label needs a transform; got labels \['head'\]"):
    tx.init(m)
  tx = bloop_optax.partition({"trunk": bloop_optax.bloop()}, {"trunk": "trunk"})
  with pytest.raises(ValueError, match="the params and param_labels"):
    tx.init(m)
