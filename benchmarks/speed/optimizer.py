"""Table 1: the optimizer step on given gradients, every Bloop variant against
Mixed, adam and the plain formula.

Memory-traffic floors (float32 words per parameter that a step must read and
write; an optimizer step here is ``tx.update`` plus ``apply_updates``):

* adam: read g, mu, nu, p; write mu, nu, p: 7.
* mixed + adam: read M, A, mu, nu, p; write mu, nu, p: 8.
* bloop + adam: 13 for any implementation with a global inner product. The
  projection coefficient needs <E', A> and <E', E'> over the WHOLE tree before
  the first output element can be written, and 3 parameter-sized arrays do not
  stay in cache, so M, A and E are read twice: pass 1 reads M, A, E (3); pass
  2 reads M, A, E, mu, nu, p and writes E, mu, nu, p (10). A single pass (10)
  is not attainable.
"""

from benchmarks.speed import _common as common

# float32 words per parameter (a bfloat16 EMA moves half a word per access).
FLOOR_WORDS = {
  "adam": 7,
  "mixed+adam": 8,
  "naive bloop+adam": 13,
  "bloop+adam": 13,
  "bloop(project_first)+adam": 13,
  "bloop(track_cosine)+adam": 13,
  "bloop(bf16 EMA)+adam": 11.5,
  # PCD: one pass reads M and A for the 2 x 2 Gram matrix, then Mixed's fused
  # combination and adam; it keeps no parameter-sized state.
  "pcd+adam": 10,
}


def _optimizers(with_bf16: bool):
  import jax.numpy as jnp
  import optax

  import bloop_optax

  adam = lambda: optax.adam(1e-3)
  variants = {
    "adam": (adam(), False),
    "mixed+adam": (optax.chain(bloop_optax.mixed(0.1), adam()), True),
    "naive bloop+adam": (optax.chain(common.naive_bloop(0.1, 0.99), adam()), True),
    "bloop+adam": (optax.chain(bloop_optax.bloop(0.1, ema_decay=0.99), adam()), True),
    "bloop(project_first)+adam": (
      optax.chain(bloop_optax.bloop(0.1, ema_decay=0.99, ema_order="project_first"), adam()),
      True,
    ),
    "bloop(track_cosine)+adam": (
      optax.chain(bloop_optax.bloop(0.1, ema_decay=0.99, track_cosine=True), adam()),
      True,
    ),
    "pcd+adam": (optax.chain(bloop_optax.pcd(0.02), adam()), True),
  }
  if with_bf16:
    variants["bloop(bf16 EMA)+adam"] = (
      optax.chain(bloop_optax.bloop(0.1, ema_decay=0.99, accumulator_dtype=jnp.bfloat16), adam()),
      True,
    )
  return variants


def _optimizer_step_at(n, leaves, rounds, inner):
  import jax

  import bloop_optax

  params = common.params_tree(n, leaves=leaves)
  count = sum(x.size for x in jax.tree.leaves(params))
  main, aux = (
    common.params_tree(n, seed=1, leaves=leaves),
    common.params_tree(n, seed=2, leaves=leaves),
  )
  fns, stats = {}, {}
  for name, (tx, takes_pair) in _optimizers(with_bf16=leaves == 8).items():
    grads = bloop_optax.MainAux(main, aux) if takes_pair else main
    step, jitted, init, call = common.optimizer_step(tx, params, grads)
    fns[name] = (init, call)
    lowered = jitted.lower(*init())
    analysis = lowered.compile().memory_analysis()
    whole = common.hlo_stats(lowered, count)
    executed = common.executed_stats(step, init, count)
    stats[name] = {
      "temp_bytes": int(analysis.temp_size_in_bytes),
      "bytes_per_param_executed": executed["bytes_per_param"],
      "fusions_executed": executed["entry_fusions"],
      "bytes_per_param_all_code": whole["bytes_per_param"],
      "fusions_all_code": whole["fusions"],
      "conditionals": whole["conditionals"],
    }
  times = common.time_interleaved(fns, rounds, inner)
  rows = []
  for name, t in times.items():
    rows.append(
      {
        "params": count,
        "leaves": len(jax.tree.leaves(params)),
        "variant": name,
        "seconds": t,
        "ratio_to_mixed_adam": t / times["mixed+adam"],
        "ratio_to_naive": t / times["naive bloop+adam"],
        "floor_ratio_to_mixed_adam": FLOOR_WORDS[name] / FLOOR_WORDS["mixed+adam"],
        "achieved_GBps_at_floor": 4 * FLOOR_WORDS[name] * count / t / 1e9,
        "param_bytes": 4 * count,
        **stats[name],
      }
    )
  return rows


def optimizer_step(sizes, leaf_counts, rounds, inner):
  """Table 1: the optimizer step at several sizes and leaf counts."""
  return [
    row
    for leaves in leaf_counts
    for n in sizes
    for row in _optimizer_step_at(n, leaves, rounds, inner)
  ]
