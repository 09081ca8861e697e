"""What every table of the speed benchmark shares: synthetic parameters, the
jitted optimizer step and its interleaved timing, XLA's cost figures, the
machine description, the printed table and the collectives of compiled HLO."""

import os
import pathlib
import platform
import re
import statistics
import time

import numpy as np

RESULTS = pathlib.Path(__file__).parent.parent / "results"


def params_tree(n_total: int, seed: int = 0, leaves: int = 8):
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

    def stub(per_leaf, pairs, k, dtype, pairwise):
      del per_leaf, pairwise
      shape = [k, k] if pairs is None else [len(pairs)]
      return _tree_math.Dots(jnp.zeros(shape, dtype), jnp.zeros([k], jnp.int32), jnp.ones([], bool))

    _tree_math._rescaled = stub

  def __exit__(self, *exc):
    self._module._rescaled = self._saved


def time_interleaved(fns: dict, rounds: int, inner: int) -> dict[str, float]:
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


def optimizer_step(tx, params, grads, init_state=None):
  """One optimizer step ``tx.update`` then ``apply_updates``, jitted with the params
  and optimizer state donated; the gradients are arguments (not constants XLA
  would fold at compile time).

  Returns:
    ``(step, jitted, init, call)``: the plain step function, its jitted form,
    ``init() -> carry`` (fresh copies of the params, the initial state and the
    gradients) and ``call(carry) -> carry`` for :func:`time_interleaved`.
  """
  import jax
  import optax

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  jitted = jax.jit(step, donate_argnums=(0, 1))

  def init():
    state = tx.init(params) if init_state is None else init_state(params)
    return jax.tree.map(lambda x: x.copy(), params), state, grads

  def call(carry):
    return (*jitted(*carry), carry[2])

  return step, jitted, init, call


def executed_stats(step, init, count: int) -> dict:
  """:func:`hlo_stats` of ``step`` compiled with the overflow branch stubbed out:
  what an ordinary step runs."""
  import jax

  with overflow_branch_stubbed():
    # A new function, so that jit traces again instead of reusing its cache.
    fresh = lambda p, s, g: step(p, s, g)
    return hlo_stats(jax.jit(fresh, donate_argnums=(0, 1)).lower(*init()), count)


def machine():
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


def table(rows, columns):
  header = "".join(f"{c:>{w}}" for c, w, _ in columns)
  lines = [header, "-" * len(header)]
  for row in rows:
    lines.append("".join(f"{fmt(row[c]):>{w}}" for c, w, fmt in columns))
  return "\n".join(lines)


COLLECTIVE = re.compile(
  r"=\s*(.+?)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|"
  r"collective-permute)(-start)?\("
)


def collectives(hlo_text):
  """(op, result shape) of every cross-device collective in compiled HLO."""
  return [(m.group(2), m.group(1)) for m in COLLECTIVE.finditer(hlo_text)]
