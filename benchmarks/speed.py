"""Speed and memory of the surgery against the alternatives, as ratios.

Usage (from the repository root)::

  python -m benchmarks.speed            # optimizer step (8 and ~200 leaves)
  python -m benchmarks.speed --full-step  # whole training steps: Bloop against Mixed
  python -m benchmarks.speed --quick    # small sizes, few rounds (smoke test)
  python -m benchmarks.speed --devices 8  # the 8-device scaling table (CPU) instead
  python -m benchmarks.speed --aggregators  # K-objective aggregators vs mean, instead

Every comparison is measured in one process, interleaving the variants round
by round (so machine noise hits all of them alike), with donated buffers, and
reported as the median over rounds divided by the baseline's median. Beside
the times, each optimizer-step row gives what a noisy machine cannot move:
XLA's cost-analysis bytes per parameter and the number of fusions, both for
the executed path of an ordinary step (the overflow branch of the surgery
stubbed out; it runs only when a float32 sum overflows) and for the whole
program. Results go to ``benchmarks/results/speed_<backend>.json``. Nothing
here is asserted.

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

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

RESULTS = pathlib.Path(__file__).parent / "results"
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


def _params(n_total: int, seed: int = 0, leaves: int = 8):
  """About ``n_total`` float32 parameters over ``leaves`` leaves.

  ``leaves=8``: eight matrices of different sizes. More leaves: the layout of
  a transformer, repeated blocks of (d, d) and (d, 4d) weight matrices, each
  followed by (d,) bias and norm vectors, so a third of the leaves are small
  vectors and many leaves share a shape.
  """
  import jax.numpy as jnp

  rng = np.random.default_rng(seed)
  if leaves == 8:
    fractions = [0.3, 0.25, 0.15, 0.1, 0.08, 0.06, 0.04, 0.02]
    shapes = []
    for f in fractions:
      size = max(int(n_total * f), 1)
      cols = 256 if size >= 256 * 4 else 1
      shapes.append((size // cols, cols) if cols > 1 else (size,))
  else:
    blocks = leaves // 6  # per block: 2 matrices and 4 vectors
    width = max(int(np.sqrt(n_total / (blocks * 6))) // 8 * 8, 8)
    shapes = []
    for _ in range(blocks):
      shapes += [(width, width), (width,), (width, 4 * width), (4 * width,), (width,), (width,)]
  return {
    f"leaf{i:03d}": jnp.asarray(rng.standard_normal(s), jnp.float32) for i, s in enumerate(shapes)
  }


def naive_bloop(aux_weight: float, ema_decay: float):
  """Bloop as a user writes it from the paper: tree_map and a sum of vdots."""
  import jax
  import jax.numpy as jnp
  import optax

  def init(params):
    return jax.tree.map(jnp.zeros_like, params)

  def update(pair, ema, params=None):
    main, aux = pair
    ema = jax.tree.map(lambda e, m: ema_decay * e + (1 - ema_decay) * m, ema, main)
    dot = lambda x, y: sum(
      jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True)
    )
    coef = dot(ema, aux) / dot(ema, ema)
    direction = jax.tree.map(lambda m, a, e: m + aux_weight * (a - coef * e), main, aux, ema)
    return direction, ema

  return optax.GradientTransformation(init, update)


def _optimizers(with_bf16: bool):
  import jax.numpy as jnp
  import optax

  import bloop_optax

  adam = lambda: optax.adam(1e-3)
  variants = {
    "adam": (adam(), False),
    "mixed+adam": (optax.chain(bloop_optax.mixed(0.1), adam()), True),
    "naive bloop+adam": (optax.chain(naive_bloop(0.1, 0.99), adam()), True),
    "bloop+adam": (optax.chain(bloop_optax.bloop(0.1, 0.99), adam()), True),
    "bloop(project_first)+adam": (
      optax.chain(bloop_optax.bloop(0.1, 0.99, ema_order="project_first"), adam()),
      True,
    ),
    "bloop(track_cosine)+adam": (
      optax.chain(bloop_optax.bloop(0.1, 0.99, track_cosine=True), adam()),
      True,
    ),
    "pcd+adam": (optax.chain(bloop_optax.pcd(0.02), adam()), True),
  }
  if with_bf16:
    variants["bloop(bf16 EMA)+adam"] = (
      optax.chain(bloop_optax.bloop(0.1, 0.99, accumulator_dtype=jnp.bfloat16), adam()),
      True,
    )
  return variants


def hlo_stats(lowered, count: int) -> dict:
  """Cost-analysis bytes per float32 parameter and fusion counts of a program.

  ``*_executed`` covers the entry computation of a program compiled with the
  surgery's overflow branch stubbed out: what an ordinary step runs. The plain
  figures cover every computation, branches included (XLA's cost analysis
  adds up both sides of a conditional).
  """
  import re

  compiled = lowered.compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, list) else analysis
  text = compiled.as_text()
  entry = text[text.index("ENTRY") :]
  fusion = re.compile(r"=\s*\S+\s+fusion\(")
  return {
    "bytes_per_param": analysis["bytes accessed"] / 4 / count,
    "fusions": len(fusion.findall(text)),
    "entry_fusions": len(fusion.findall(entry)),
    "conditionals": text.count(" conditional("),
  }


class overflow_branch_stubbed:
  """Within: the surgery's overflow branch is a no-op (for cost analysis only)."""

  def __enter__(self):
    import jax.numpy as jnp

    from bloop_optax import _tree_math

    self._module, self._saved = _tree_math, _tree_math._rescaled

    def stub(trees, pairs, dtype):
      return _tree_math.Dots(
        jnp.zeros([len(pairs)], dtype), jnp.zeros([len(trees)], jnp.int32), jnp.ones([], bool)
      )

    _tree_math._rescaled = stub

  def __exit__(self, *exc):
    self._module._rescaled = self._saved


def _time_interleaved(fns: dict, rounds: int, inner: int) -> dict[str, float]:
  """Median seconds per call of each ``fn(state) -> state``, interleaved."""
  import jax

  states = {name: init() for name, (init, _) in fns.items()}
  for name, (_, fn) in fns.items():  # compile and warm up
    states[name] = jax.block_until_ready(fn(states[name]))
  samples = {name: [] for name in fns}
  for _ in range(rounds):
    for name, (_, fn) in fns.items():
      state = states[name]
      start = time.perf_counter()
      for _ in range(inner):
        state = fn(state)
      jax.block_until_ready(state)
      samples[name].append((time.perf_counter() - start) / inner)
      states[name] = state
  return {name: statistics.median(s) for name, s in samples.items()}


def _optimizer_step_at(n, leaves, rounds, inner):
  import jax
  import optax

  import bloop_optax

  params = _params(n, leaves=leaves)
  count = sum(x.size for x in jax.tree.leaves(params))
  main, aux = _params(n, seed=1, leaves=leaves), _params(n, seed=2, leaves=leaves)
  fns, stats = {}, {}
  for name, (tx, takes_pair) in _optimizers(with_bf16=leaves == 8).items():
    grads = bloop_optax.MainAux(main, aux) if takes_pair else main

    # The gradients are arguments, not closed-over constants that XLA would
    # fold at compile time; only the params and optimizer state are donated.
    def step(p, s, g, tx=tx):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    jitted = jax.jit(step, donate_argnums=(0, 1))

    def init(tx=tx, grads=grads):
      return jax.tree.map(lambda x: x.copy(), params), tx.init(params), grads

    def call(carry, jitted=jitted):
      return (*jitted(*carry), carry[2])

    fns[name] = (init, call)
    lowered = jitted.lower(*init())
    analysis = lowered.compile().memory_analysis()
    whole = hlo_stats(lowered, count)
    with overflow_branch_stubbed():
      # A new function, so that jit traces again instead of reusing its cache.
      fresh = lambda p, s, g, step=step: step(p, s, g)
      executed = hlo_stats(jax.jit(fresh, donate_argnums=(0, 1)).lower(*init()), count)
    stats[name] = {
      "temp_bytes": int(analysis.temp_size_in_bytes),
      "bytes_per_param_executed": executed["bytes_per_param"],
      "fusions_executed": executed["entry_fusions"],
      "bytes_per_param_all_code": whole["bytes_per_param"],
      "fusions_all_code": whole["fusions"],
      "conditionals": whole["conditionals"],
    }
  times = _time_interleaved(fns, rounds, inner)
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


# ---------------------------------------------------------------- aggregators

# (label, factory name, keyword arguments). Krum needs K >= 3 and CR-MOGM wraps
# another aggregator (its cost is that one's): neither is in the table.
AGGREGATOR_VARIANTS = [
  ("mean", "mean", {}),
  ("mgda", "mgda", {}),
  ("pcgrad", "pcgrad", {}),
  ("cagrad", "cagrad", {}),
  ("imtl_g", "imtl_g", {}),
  ("aligned_mtl", "aligned_mtl", {}),
  ("upgrad", "upgrad", {}),
  ("dualproj", "dualproj", {}),
  ("config", "config", {}),
  ("nash_mtl", "nash_mtl", {}),
  ("fairgrad", "fairgrad", {"alpha": 2.0}),
  ("gradvac", "gradvac", {}),
  ("mgda(EMA)", "mgda", {"ema_decay": 0.99}),
  ("upgrad(EMA)", "upgrad", {"ema_decay": 0.99}),
  ("moco (tracking 0.9)", "moco", {}),
]


def _aggregator_step_at(k, n, rounds, inner):
  import jax
  import optax

  from bloop_optax import aggregators

  params = _params(n)
  count = sum(x.size for x in jax.tree.leaves(params))
  grads = tuple(_params(n, seed=1 + i) for i in range(k))
  fns, stats = {}, {}
  for label, name, kwargs in AGGREGATOR_VARIANTS:
    tx = optax.chain(getattr(aggregators, name)(k, **kwargs), optax.adam(1e-3))

    def step(p, s, g, tx=tx):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    jitted = jax.jit(step, donate_argnums=(0, 1))

    def init(tx=tx):
      return jax.tree.map(lambda x: x.copy(), params), tx.init(params), grads

    def call(carry, jitted=jitted):
      return (*jitted(*carry), carry[2])

    fns[label] = (init, call)
    with overflow_branch_stubbed():
      fresh = lambda p, s, g, step=step: step(p, s, g)
      stats[label] = hlo_stats(jax.jit(fresh, donate_argnums=(0, 1)).lower(*init()), count)
  times = _time_interleaved(fns, rounds, inner)
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

  params = _params(n)
  count = sum(x.size for x in jax.tree.leaves(params))
  grads = tuple(_params(n, seed=1 + i) for i in range(k))
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
    tx = optax.chain(getattr(aggregators, name)(k, **kwargs), optax.adam(1e-3))

    def step(p, s, g, tx=tx):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    def init(tx=tx):
      return jax.tree.map(lambda x: x.copy(), params), tx.init(params), grads

    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*init()).compile()
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
  times = _time_interleaved(fns, rounds, inner)
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


# ---------------------------------------------------------------- full steps


def _mlp_task(batch=256, width=1024, two_heads=False):
  """A 3-layer MLP with dropout on synthetic data.

  ``two_heads=False``: aux = 0.5 |theta|^2 (a regulariser). ``two_heads=True``:
  a second head on the same trunk and batch, aux = its cross-entropy on a
  second label set (multi-task; both losses need the dropout forward pass).
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
      for _ in range(2):
        x = nn.Dropout(0.1, deterministic=not train)(nn.relu(nn.Dense(width)(x)))
      return nn.Dense(10)(x), nn.Dense(10)(x)

  model = MLP()
  x = jax.random.normal(jax.random.key(0), (batch, 256))
  y = jax.random.randint(jax.random.key(1), (batch, 2), 0, 10)
  params = model.init(jax.random.key(2), x, train=False)["params"]
  if not two_heads:
    params = {k: v for k, v in params.items() if k != "Dense_3"}

  def ce(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  def losses(params, key):
    full = params if two_heads else {**params, "Dense_3": frozen_head}
    main_logits, aux_logits = model.apply({"params": full}, x, rngs={"dropout": key})
    if two_heads:
      return ce(main_logits, y[:, 0]), ce(aux_logits, y[:, 1])
    return ce(main_logits, y[:, 0]), 0.5 * sum(jnp.sum(p**2) for p in jax.tree.leaves(params))

  frozen_head = model.init(jax.random.key(2), x, train=False)["params"]["Dense_3"]
  return params, losses


def _transformer_task(batch=16):
  """The text task's byte transformer (width 128) on random bytes."""
  import jax
  import jax.numpy as jnp
  import optax

  from benchmarks import text

  model = text.ByteTransformer(width=128, heads=4, layers=2)
  tokens = jax.random.randint(jax.random.key(0), (batch, text.CONTEXT + 1), 0, 256)
  aux_tokens = jax.random.randint(jax.random.key(1), (batch, text.CONTEXT + 1), 0, 256)
  params = model.init(jax.random.key(2), tokens[:, :-1])["params"]

  def ce(params, w):
    logits = model.apply({"params": params}, w[:, :-1])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, w[:, 1:]))

  def losses(params, key):
    del key
    return ce(params, tokens), ce(params, aux_tokens)

  return params, losses


def _digits_task(batch=256):
  """The ``digits`` experiment's network and losses on a batch of 256 digits.

  MLP 64-256-128-10; main = cross-entropy, aux = the log of the product of the
  layers' spectral norms by one power iteration (from fixed start vectors).
  """
  import jax
  import jax.numpy as jnp

  from benchmarks import tasks

  x, y, _, _ = tasks.digits_split()
  sizes = (64, 256, 128, 10)
  params = tasks._dense_init(jax.random.key(0), sizes)
  vs = [jax.random.normal(jax.random.key(i), (b,)) for i, b in enumerate(sizes[1:])]
  vs = [v / jnp.linalg.norm(v) for v in vs]

  def losses(params, key):
    idx = jax.random.choice(key, len(x), (batch,), replace=False)
    main = tasks._cross_entropy(tasks._mlp(params, x[idx]), y[idx])
    sigmas = [tasks.spectral_norm(p["w"], v, 1)[0] for p, v in zip(params, vs, strict=True)]
    aux = sum(jnp.log(s) for s in sigmas)
    return main, aux

  return params, losses


FULL_STEP_BASELINE = "mixed: jax.grad(main + lam aux) + adam"


def _full_step_for(model_name, params, losses, rounds, inner):
  import jax
  import optax

  import bloop_optax

  count = sum(x.size for x in jax.tree.leaves(params))
  lam = 0.1
  bloop_tx = optax.chain(bloop_optax.bloop(lam, 0.99), optax.adam(1e-3))
  pcd_tx = optax.chain(bloop_optax.pcd(0.02), optax.adam(1e-3))
  naive_tx = optax.chain(naive_bloop(lam, 0.99), optax.adam(1e-3))
  adam = optax.adam(1e-3)

  # Each variant: the direction its optimizer takes from (params, PRNG key),
  # then the same update, apply and key split.
  def bloop_direction(p, sub):
    return bloop_optax.value_and_grads(losses)(p, sub)[1]

  def two_grads(p, sub):
    return tuple(jax.grad(lambda p, i=i: losses(p, sub)[i])(p) for i in (0, 1))

  def mixed_grad(p, sub):
    def total(p):
      main, aux = losses(p, sub)
      return main + lam * aux

    return jax.grad(total)(p)

  def main_grad(p, sub):
    return jax.grad(lambda p: losses(p, sub)[0])(p)

  def variant(tx, gradients):
    def step(carry):
      p, s, key = carry
      key, sub = jax.random.split(key)
      u, s = tx.update(gradients(p, sub), s, p)
      return optax.apply_updates(p, u), s, key

    def start():
      return jax.tree.map(lambda x: x.copy(), params), tx.init(params), jax.random.key(0)

    return start, jax.jit(step, donate_argnums=0)

  fns = {
    FULL_STEP_BASELINE: variant(adam, mixed_grad),
    "bloop: value_and_grads + bloop + adam": variant(bloop_tx, bloop_direction),
    "pcd: value_and_grads + pcd + adam": variant(pcd_tx, bloop_direction),
    "2x jax.grad + plain formula + adam": variant(naive_tx, two_grads),
    "main loss only: jax.grad + adam": variant(adam, main_grad),
  }
  times = _time_interleaved(fns, rounds, inner)
  base = times[FULL_STEP_BASELINE]
  return [
    {
      "model": model_name,
      "params": count,
      "variant": name,
      "seconds": t,
      "ratio_to_mixed": t / base,
    }
    for name, t in times.items()
  ]


def full_step(rounds, inner):
  """Table 2: a whole training step, Bloop against Mixed and the alternatives."""
  rows = []
  for model_name, make in MODELS.items():
    params, losses = make()
    rows += _full_step_for(model_name, params, losses, rounds, inner)
  return rows


MODELS = {
  "digits_mlp_lipschitz": _digits_task,
  "mlp_dropout_l2": _mlp_task,
  "mlp_dropout_two_heads": lambda: _mlp_task(two_heads=True),
  "transformer_two_datasets": _transformer_task,
}


# ---------------------------------------------------------------- scaling


def _scaling_at(per_device, rounds, inner):
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  import optax

  import bloop_optax
  from tests.sharding_worker import collectives

  devices = jax.device_count()
  mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))

  def put(tree):
    def one(x):
      spec = P("data") if x.shape[0] % devices == 0 else P()
      return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree.map(one, tree)

  params = put(_params(per_device * devices))
  pair = bloop_optax.MainAux(
    put(_params(per_device * devices, 1)), put(_params(per_device * devices, 2))
  )
  fns, hlo_ops = {}, {}
  for name, tx in (
    ("mixed+adam", optax.chain(bloop_optax.mixed(0.1), optax.adam(1e-3))),
    ("bloop+adam", optax.chain(bloop_optax.bloop(0.1, 0.99), optax.adam(1e-3))),
  ):

    def step(p, s, g, tx=tx):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    def init(tx=tx):
      return jax.tree.map(lambda x: x.copy(), params), jax.jit(tx.init)(params), pair

    jitted = jax.jit(step, donate_argnums=(0, 1))

    def call(carry, jitted=jitted):
      return (*jitted(*carry), carry[2])

    fns[name] = (init, call)
    hlo_ops[name] = collectives(jitted.lower(*init()).compile().as_text())
  times = _time_interleaved(fns, rounds, inner)
  return [
    {
      "devices": devices,
      "params_per_device": per_device,
      "variant": name,
      "seconds": t,
      "ratio_to_mixed_adam": t / times["mixed+adam"],
      "collectives": hlo_ops[name],
    }
    for name, t in times.items()
  ]


def scaling(sizes_per_device, rounds, inner):
  """Table 3: N devices, params sharded; time per step and collectives."""
  return [row for n in sizes_per_device for row in _scaling_at(n, rounds, inner)]


# ---------------------------------------------------------------- report


def _machine():
  import jax

  device = jax.devices()[0]
  return {
    "backend": jax.default_backend(),
    "device": getattr(device, "device_kind", str(device)),
    "device_count": jax.device_count(),
    "cpu_count": os.cpu_count(),
    "platform": platform.platform(),
    "jax": jax.__version__,
  }


def _table(rows, columns):
  header = "".join(f"{c:>{w}}" for c, w, _ in columns)
  lines = [header, "-" * len(header)]
  for row in rows:
    lines.append("".join(f"{fmt(row[c]):>{w}}" for c, w, fmt in columns))
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="small sizes (65k and 262k params) and 3 rounds of 2 calls: a smoke test, not a"
    " measurement; writes *_quick.json",
  )
  parser.add_argument(
    "--devices",
    type=int,
    default=0,
    help="if N > 0, force N CPU devices and run only the sharded scaling table",
  )
  parser.add_argument(
    "--aggregators",
    action="store_true",
    help="run only the table of the K-objective aggregators (K = 2, 4, 8) + adam against"
    " mean + adam",
  )
  parser.add_argument(
    "--many-objectives",
    action="store_true",
    help="run only the table of the aggregators at K = 16 and 64 objectives: compile time,"
    " step time against mean + adam, and the weight rule's own time",
  )
  parser.add_argument(
    "--full-step",
    action="store_true",
    help="run only the table of whole training steps (Bloop, Mixed and the alternatives on"
    " the digits MLP, two dropout MLPs and the text transformer)",
  )
  parser.add_argument(
    "--objectives",
    type=int,
    nargs="+",
    default=[16, 64],
    help="with --many-objectives: the numbers of objectives K to measure",
  )
  parser.add_argument(
    "--out", type=pathlib.Path, default=RESULTS, help="folder for the JSON results"
  )
  args = parser.parse_args(argv)
  if args.devices:
    # Must happen before JAX starts: run the scaling table in this process only.
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))
  args.out.mkdir(parents=True, exist_ok=True)
  rounds, inner = (3, 2) if args.quick else (15, 5)
  report = {"machine": _machine(), "rounds": rounds, "calls_per_round": inner}
  g = lambda x: f"{x:.3g}"
  if args.devices:
    per_device = [2**14, 2**17] if args.quick else [2**17, 2**20, 2**22]
    report["scaling"] = scaling(per_device, rounds, inner)
    print(
      _table(
        report["scaling"],
        [
          ("params_per_device", 18, str),
          ("variant", 14, str),
          ("seconds", 12, g),
          ("ratio_to_mixed_adam", 20, lambda x: f"{x:.3f}"),
          ("collectives", 60, lambda ops: ", ".join(f"{o} {s}" for o, s in ops) or "none"),
        ],
      )
    )
    name = f"speed_scaling_{report['machine']['backend']}.json"
  elif args.many_objectives:
    sizes = [2**14] if args.quick else [2**18, 2**20]
    ks = [16] if args.quick else args.objectives
    report["many_objectives"] = many_objectives(ks, sizes, rounds, inner)
    print("== aggregator + adam at many objectives, ratios to mean + adam (8 leaves)")
    print(
      _table(
        report["many_objectives"],
        [
          ("params", 10, str),
          ("objectives", 11, str),
          ("variant", 14, str),
          ("compile_seconds", 16, lambda x: f"{x:.1f}"),
          ("seconds", 11, g),
          ("ratio_to_mean_adam", 20, lambda x: f"{x:.3f}"),
          ("rule_seconds", 13, g),
        ],
      )
    )
    suffix = "" if ks == [16, 64] else "_k" + "_".join(map(str, ks))
    name = f"speed_many_objectives{suffix}_{report['machine']['backend']}.json"
  elif args.full_step:
    report["full_step"] = full_step(rounds, inner)
    print("== whole training step, ratios to the Mixed step (one jax.grad of main + lam aux, adam)")
    print(
      _table(
        report["full_step"],
        [
          ("model", 25, str),
          ("params", 9, str),
          ("variant", 40, str),
          ("seconds", 11, g),
          ("ratio_to_mixed", 15, lambda x: f"{x:.3f}"),
        ],
      )
    )
    name = f"speed_full_step_{report['machine']['backend']}.json"
  elif args.aggregators:
    sizes = [2**16] if args.quick else [2**20, 2**22]
    report["aggregators"] = aggregator_step([2, 4, 8], sizes, rounds, inner)
    print("== aggregator + adam, ratios to mean + adam (8 leaves)")
    print(
      _table(
        report["aggregators"],
        [
          ("params", 10, str),
          ("objectives", 11, str),
          ("variant", 14, str),
          ("seconds", 11, g),
          ("ratio_to_mean_adam", 20, lambda x: f"{x:.3f}"),
          ("bytes_per_param_executed", 25, lambda x: f"{x:.2f}"),
          ("fusions_executed", 17, str),
        ],
      )
    )
    name = f"speed_aggregators_{report['machine']['backend']}.json"
  else:
    sizes = [2**16, 2**18] if args.quick else [2**20, 2**23, 2**25]
    report["optimizer_step"] = optimizer_step(sizes, [8, 200], rounds, inner)
    print("== optimizer step (tx.update + apply_updates)")
    print(
      _table(
        report["optimizer_step"],
        [
          ("params", 10, str),
          ("leaves", 7, str),
          ("variant", 27, str),
          ("seconds", 10, g),
          ("ratio_to_mixed_adam", 20, lambda x: f"{x:.3f}"),
          ("ratio_to_naive", 15, lambda x: f"{x:.3f}"),
          ("bytes_per_param_executed", 25, lambda x: f"{x:.2f}"),
          ("fusions_executed", 17, str),
          ("bytes_per_param_all_code", 25, lambda x: f"{x:.2f}"),
          ("temp_bytes", 12, str),
        ],
      )
    )
    name = f"speed_{report['machine']['backend']}.json"
  if args.quick:
    name = name.replace(".json", "_quick.json")
  (args.out / name).write_text(json.dumps(report, indent=1))
  print(f"\nmachine: {report['machine']}\nwrote {args.out / name}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
