"""The K-objective aggregators + adam against mean + adam: K = 2, 4, 8 with cost
figures, and many objectives (K = 16, 64) with compile times."""

import time

import numpy as np

from benchmarks.speed import _common as common
from bloop_optax.aggregators import _catalogue

# (label, aggregator name, keyword arguments): every aggregator of the catalogue
# that takes K = 2 (Krum needs K >= 3), then two with the EMA option. CR-MOGM
# wraps another aggregator (its cost is that one's) and is not in the table.
AGGREGATOR_VARIANTS = [
  (e.name if e.name != "moco" else "moco (tracking 0.9)", e.name, {})
  for e in _catalogue.ENTRIES
  if e.min_objectives <= 2
] + [("mgda(EMA)", "mgda", {"ema_decay": 0.99}), ("upgrad(EMA)", "upgrad", {"ema_decay": 0.99})]


def _aggregator_step_at(k, n, rounds, inner):
  import jax
  import optax

  from bloop_optax.aggregators import _catalogue

  params = common.params_tree(n)
  count = sum(x.size for x in jax.tree.leaves(params))
  grads = tuple(common.params_tree(n, seed=1 + i) for i in range(k))
  fns, stats = {}, {}
  for label, name, kwargs in AGGREGATOR_VARIANTS:
    tx = optax.chain(_catalogue.BY_NAME[name].make(k, **kwargs), optax.adam(1e-3))
    step, _, init, call = common.optimizer_step(tx, params, grads)
    fns[label] = (init, call)
    stats[label] = common.executed_stats(step, init, count)
  times = common.time_interleaved(fns, rounds, inner)
  return [
    {
      "objectives": k,
      "params": count,
      "variant": label,
      "seconds": t,
      "ratio_to_mean_adam": t / times["mean"],
      "bytes_per_param_executed": stats[label]["bytes_per_param"],
      "fusions_executed": stats[label]["entry_fusions"],
    }
    for label, t in times.items()
  ]


def aggregator_step(ks, sizes, rounds, inner):
  """Each aggregator + adam against mean + adam, for K objectives (8 leaves)."""
  return [row for n in sizes for k in ks for row in _aggregator_step_at(k, n, rounds, inner)]


def _many_objectives_at(k, n, rounds, inner):
  """Compile time, step time against mean + adam, and the weight rule's own
  time (on a K x K Gram matrix: it does not grow with the model), for K
  objectives."""
  import jax
  import jax.numpy as jnp
  import optax

  from bloop_optax import aggregators
  from bloop_optax.aggregators import _catalogue

  params = common.params_tree(n)
  count = sum(x.size for x in jax.tree.leaves(params))
  grads = tuple(common.params_tree(n, seed=1 + i) for i in range(k))
  rng = np.random.default_rng(0)
  jac = rng.standard_normal((k, 4 * k)).astype(np.float32)
  gram = jnp.asarray(jac @ jac.T)
  orders = jnp.tile(jnp.arange(k), (k, 1))
  rules = {
    "mean": aggregators.mean_weights,
    "mgda": aggregators.mgda_weights,
    "pcgrad": lambda g: aggregators.pcgrad_weights(g, orders),
    "cagrad": aggregators.cagrad_weights,
    "imtl_g": aggregators.imtl_g_weights,
    "aligned_mtl": aggregators.aligned_mtl_weights,
    "upgrad": aggregators.upgrad_weights,
  }
  fns, compile_seconds, rule_seconds = {}, {}, {}
  for label, name, kwargs in AGGREGATOR_VARIANTS:
    if name not in rules:  # this table covers the first seven rules
      continue
    tx = optax.chain(_catalogue.BY_NAME[name].make(k, **kwargs), optax.adam(1e-3))
    _, jitted, init, _ = common.optimizer_step(tx, params, grads)
    start = time.perf_counter()
    compiled = jitted.lower(*init()).compile()
    compile_seconds[label] = time.perf_counter() - start

    def call(carry, compiled=compiled):
      return (*compiled(*carry), carry[2])

    fns[label] = (init, call)
    rule = jax.jit(rules[name])
    jax.block_until_ready(rule(gram))
    start = time.perf_counter()
    for _ in range(20):
      out = rule(gram)
    jax.block_until_ready(out)
    rule_seconds[label] = (time.perf_counter() - start) / 20
  times = common.time_interleaved(fns, rounds, inner)
  return [
    {
      "objectives": k,
      "params": count,
      "variant": label,
      "compile_seconds": compile_seconds[label],
      "seconds": t,
      "ratio_to_mean_adam": t / times["mean"],
      "rule_seconds": rule_seconds[label],
    }
    for label, t in times.items()
  ]


def many_objectives(ks, sizes, rounds, inner):
  """The aggregators at K = 16 and 64 objectives (8 leaves)."""
  return [row for n in sizes for k in ks for row in _many_objectives_at(k, n, rounds, inner)]
