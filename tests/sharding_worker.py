"""Runs bloop on 8 forced CPU devices and prints what the sharding test checks.

Run as a subprocess by tests/test_sharding.py: the device count must be set
before JAX starts, which a pytest process that already imported JAX cannot do.
Prints one JSON object on stdout.
"""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import bloop_optax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.speed._common import collectives  # noqa: E402
from tests import catalogue  # noqa: E402


def main(axis_type_name, coverage="full"):
  axis_type = getattr(AxisType, axis_type_name)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
  specs = {"w": P("data", None), "v": P("data"), "b": P()}
  shapes = {"w": (256, 12), "v": (8 * 37,), "b": (5,)}
  rng = np.random.default_rng(0)

  def tree(scale):
    return {k: jnp.asarray(scale * rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}

  params = tree(1.0)
  steps = [(tree(1.0), tree(1.0)) for _ in range(5)]
  tx = optax.chain(bloop_optax.bloop(0.7, ema_decay=0.8), optax.adam(1e-2))

  def run(params, steps, put):
    update = jax.jit(tx.update)
    p = put(params)
    state = jax.jit(tx.init)(p)
    for m, a in steps:
      d, state = update(bloop_optax.MainAux(put(m), put(a)), state, p)
      p = optax.apply_updates(p, d)
    return p, state, d, update

  single_dev = jax.devices()[0]
  p1, s1, _, _ = run(params, steps, lambda t: jax.device_put(t, single_dev))

  shard = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  put = lambda t: {k: jax.device_put(v, shard[k]) for k, v in t.items()}
  # jax.set_mesh, or jax.sharding.use_mesh as jax 0.6 names it.
  set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
  with set_mesh(mesh):
    p8, s8, d8, update = run(params, steps, put)
    m, a = steps[0]
    hlo = update.lower(bloop_optax.MainAux(put(m), put(a)), s8, put(params)).compile().as_text()

  diff = lambda x, y: max(
    float(np.max(np.abs(np.asarray(x[k]) - np.asarray(y[k])))) for k in shapes
  )
  same_sharding = lambda t: {
    k: t[k].sharding.is_equivalent_to(shard[k], len(shapes[k])) for k in shapes
  }
  # The multi-objective aggregators: three objectives, with and without EMAs.
  from bloop_optax import aggregators

  triples = [(tree(1.0), tree(1.0), tree(1.0)) for _ in range(3)]
  # Many objectives, with the Gram matrix in its stacked form (one product of the
  # stacked leaves per leaf, as past MAX_PAIRWISE_REDUCTIONS): it all-reduces the
  # K x K matrix.
  many = [tuple(tree(1.0) for _ in range(12)) for _ in range(2)]
  pairwise_limit = bloop_optax._tree_math.MAX_PAIRWISE_REDUCTIONS
  agg_report = {}
  for name, agg_tx, steps_of_grads in [
    *(
      (case.name, case.make(), triples)
      for case in catalogue.one_per_aggregator()
      if catalogue.covered_on_devices(case.name, coverage)
    ),
    ("hierarchical_bloop", bloop_optax.hierarchical_bloop((0.5, 0.5), ema_decay=0.8), triples),
    ("upgrad_ema_k12", aggregators.upgrad(12, ema_decay=0.8), many),
  ]:
    chain = optax.chain(agg_tx, optax.sgd(0.1))
    stacked = steps_of_grads is many
    bloop_optax._tree_math.MAX_PAIRWISE_REDUCTIONS = 0 if stacked else pairwise_limit

    def run_agg(put, chain=chain, steps_of_grads=steps_of_grads):
      # Compiled once, ahead of time: the same executable runs the steps and
      # gives the HLO whose collectives are checked.
      p = put(params)
      state = jax.jit(chain.init)(p)
      first = tuple(put(g) for g in steps_of_grads[0])
      update = jax.jit(chain.update).lower(first, state, p).compile()
      # With automatic sharding the step may return its state laid out unlike
      # its inputs: each step's arguments are put where the executable wants them.
      wanted = update.input_shardings[0]
      for grads in steps_of_grads:
        args = jax.device_put((tuple(put(g) for g in grads), state, p), wanted)
        d, state = update(*args)
        p = optax.apply_updates(p, d)
      return p, d, update.as_text()

    q1, _, _ = run_agg(lambda t: jax.device_put(t, single_dev))
    with set_mesh(mesh):
      q8, d8_agg, agg_hlo = run_agg(put)
    bloop_optax._tree_math.MAX_PAIRWISE_REDUCTIONS = pairwise_limit
    agg_report[name] = {
      "params_max_diff": diff(q8, q1),
      "direction_keeps_sharding": all(same_sharding(d8_agg).values()),
      "collectives": collectives(agg_hlo),
    }

  # optax's sharding contract: on an explicit mesh, a step leaves the type of
  # every state leaf (shape, dtype and sharding) as init made it.
  state_types = {}
  if axis_type_name == "Explicit":
    typeof = getattr(jax, "typeof", None) or jax.core.get_aval
    for case in catalogue.CASES:
      if not catalogue.covered_on_devices(case.name, coverage):
        continue
      tx = case.make()
      with set_mesh(mesh):
        p = put(params)
        before = jax.jit(tx.init)(p)
        updates = catalogue.grads(case, 1, like=params)
        updates = (
          type(updates)(*[put(t) for t in updates])
          if case.n == 2
          else tuple(put(t) for t in updates)
        )
        _, after = jax.jit(tx.update)(updates, before, p)
      kinds = lambda t: [str(typeof(x)) for x in jax.tree.leaves(t)]
      state_types[case.name] = kinds(before) == kinds(after)

  return {
    "coverage": coverage,
    "state_types": state_types,
    "aggregators": agg_report,
    "devices": jax.device_count(),
    "params_max_diff": diff(p8, p1),
    "ema_max_diff": diff(s8[0].main_ema, s1[0].main_ema),
    "ema_keeps_sharding": same_sharding(s8[0].main_ema),
    "direction_keeps_sharding": same_sharding(d8),
    "w_is_split": len(s8[0].main_ema["w"].sharding.device_set) == 8,
    "collectives": collectives(hlo),
  }


if __name__ == "__main__":
  print(json.dumps(main(*sys.argv[1:])))
