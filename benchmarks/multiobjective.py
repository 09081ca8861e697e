"""K objectives of equal standing: every aggregator, with and without an EMA.

Two experiments, each run with ``python -m benchmarks.multiobjective``:

* ``--part task``: three objectives on overlaid digits (scikit-learn's
  bundled 8x8 digits). An input is ``A + 0.5 B`` for a training digit ``A``
  and a partner ``B`` drawn anew every epoch; a shared MLP trunk 64-256-128
  has three heads: the label of ``A`` (10 classes), the label of ``B`` (10
  classes) and the parity of ``A + B`` (2 classes). The heads compete for the
  trunk. Every aggregator of ``bloop_optax.aggregators`` is run as published
  (``ema_decay=None``) and with ``ema_decay=0.99``, followed by the same Adam
  (learning rate 1e-3, 5% warm-up then cosine decay), batches of 64, the same
  epochs and the same seeds (seed s gives every method the same
  initialisation and the same batches). Adam makes the comparison fair across
  the aggregators' different output scales (PCGrad sums, the others average).
  Scores: the held-out cross-entropy of each objective and their mean at the
  end, mean and 95% Student-t interval over seeds; paired by seed, the
  difference EMA minus no EMA and the difference to ``mean``, each called a
  win or a loss only when its interval excludes 0.

* ``--part monte_carlo``: the paper's Figure 2 for each aggregator. Three
  fixed gradients ``g_i ~ N(0, I_100)`` (the second pulled against the first
  so that they conflict); a batch gives ``g_i + σ ε_i``. The aggregator's
  direction on the noise-free gradients, ``d* = sum_i w_i(g) g_i``, is the
  target. The decision on batch gradients gives weights ``w`` (without EMA:
  from one batch; with EMA: from EMAs of the batch gradients after
  ``4 / (1 - ema_decay)`` steps); reported is ``|E[w] g - d*| / |d*|``, the
  expected weights applied to the noise-free gradients, i.e. the bias of the
  decision itself (the batch noise in the final weighted sum averages out, and
  leaving it in would only add sampling noise). Expectations over 4,000 draws
  (no EMA) or 1,000 independent chains (EMA).

Results go to ``<out>/multiobjective_digits.{json,png}`` and
``<out>/multiobjective_monte_carlo.{json,png}`` (default: the git-ignored
``results/``).
"""

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import bloop_optax
from bloop_optax import aggregators
from bloop_optax.aggregators import _catalogue

# The baseline, then every aggregator with the EMA option (MoCo's is not
# optional: it is listed with its two trackings below).
NAMES = ["mean"] + [e.name for e in _catalogue.ENTRIES if e.ema is True]
# Rules whose decision depends on what they learnt over earlier steps: no
# single noise-free decision to measure a bias against in the Monte Carlo.
STATEFUL = {"gradvac"}
OBJECTIVES = ["label of A", "label of B", "parity of A + B"]
EMA_DECAY = 0.99


def factory(name: str):
  """``factory(k, **options)`` for an aggregator of ``NAMES``."""
  return _catalogue.BY_NAME[name].make


def methods(k: int) -> dict:
  out = {"mean": lambda: aggregators.mean(k)}
  for name in NAMES[1:]:
    make = factory(name)
    out[name] = lambda f=make: f(k)
    out[f"{name}+EMA"] = lambda f=make: f(k, ema_decay=EMA_DECAY)
  out["random"] = lambda: aggregators.random(k, key=0)  # weights ignore the gradients: no EMA
  # CR-MOGM smooths MGDA's weights (not the gradients), with the same decay.
  # MoCo's tracking is its EMA (it has no variant without): at its default
  # 0.9 and at the 0.99 the others use; it steps its weights toward MGDA's.
  out["mgda+CR-MOGM"] = lambda: aggregators.cr_mogm(aggregators.mgda(k), weights_decay=EMA_DECAY)
  out["moco"] = lambda: aggregators.moco(k)
  out["moco, tracking 0.99"] = lambda: aggregators.moco(k, ema_decay=EMA_DECAY)
  return out


# ------------------------------------------------------------------- task


def _digits():
  from benchmarks.tasks import digits_split

  return digits_split()


def _dense(key, sizes):
  keys = jax.random.split(key, len(sizes) - 1)
  return [
    {"w": jax.random.normal(k, (a, b)) * jnp.sqrt(2.0 / a), "b": jnp.zeros(b)}
    for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
  ]


def _apply(layers, x, last_relu=False):
  for i, layer in enumerate(layers):
    x = x @ layer["w"] + layer["b"]
    if i < len(layers) - 1 or last_relu:
      x = jax.nn.relu(x)
  return x


def _ce(logits, labels):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def make_task(epochs: int, batch: int = 64):
  x, y, x_test, y_test = _digits()
  rng = np.random.default_rng(1)

  def overlay(xs, ys, partner):
    return xs + 0.5 * xs[partner], ys, ys[partner]

  held_out = overlay(x_test, y_test, jnp.asarray(rng.permutation(len(x_test))))
  steps_per_epoch = len(x) // batch

  def init(key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
      "trunk": _dense(k1, (64, 256, 128)),
      "heads": [_dense(k, (128, n)) for k, n in zip((k2, k3, k4), (10, 10, 2), strict=True)],
    }

  def losses(params, xb, ya, yb):
    h = _apply(params["trunk"], xb, last_relu=True)
    targets = (ya, yb, (ya + yb) % 2)
    return tuple(_ce(_apply(head, h), t) for head, t in zip(params["heads"], targets, strict=True))

  def train(method, seeds, progress=None):
    evals = min(10, epochs)
    tx = optax.chain(
      method(),
      optax.adam(
        optax.warmup_cosine_decay_schedule(
          0, 1e-3, epochs * steps_per_epoch // 20, epochs * steps_per_epoch
        )
      ),
    )
    grads_of = bloop_optax.value_and_grads(losses)

    def step(carry, b):
      params, state = carry
      _, grads = grads_of(params, *b)
      u, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, u), state), None

    def epoch(carry, index, key):
      k_order, k_partner = jax.random.split(jax.random.fold_in(key, index))
      data = overlay(x, y, jax.random.permutation(k_partner, len(x)))
      order = jax.random.permutation(k_order, len(x))[: steps_per_epoch * batch]
      batches = jax.tree.map(lambda a: a[order].reshape(steps_per_epoch, batch, *a.shape[1:]), data)
      carry, _ = jax.lax.scan(step, carry, batches)
      return carry

    def block(carry, indices, key):
      carry, _ = jax.lax.scan(lambda c, i: (epoch(c, i, key), None), carry, indices)
      return carry, jnp.stack(losses(carry[0], *held_out))

    keys = jax.vmap(jax.random.key)(jnp.arange(seeds))
    params = jax.vmap(init)(keys)
    carry = (params, jax.vmap(tx.init)(params))
    run_block = jax.jit(jax.vmap(block, in_axes=(0, None, 0)))
    history = [np.asarray(jax.vmap(lambda p: jnp.stack(losses(p, *held_out)))(params))]
    per = epochs // evals
    for e in range(evals):
      carry, metrics = run_block(carry, jnp.arange(e * per, (e + 1) * per), keys)
      history.append(np.asarray(jax.block_until_ready(metrics)))
      if progress is not None:
        progress.update(per * steps_per_epoch)
    return np.stack(history, axis=1)  # [seeds, evals + 1, K]

  return train, steps_per_epoch


def _interval(values):
  from scipy import stats

  values = np.asarray(values, np.float64)
  mean = float(values.mean())
  half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
  return mean, mean - half, mean + half


def _verdict(lo, hi):
  return "lower" if hi < 0 else "higher" if lo > 0 else "tie"


def run_task(out: pathlib.Path, seeds: int, epochs: int) -> str:
  train, steps_per_epoch = make_task(epochs)
  table = methods(3)
  curves = {}
  with tqdm(total=len(table) * epochs * steps_per_epoch, desc="multiobjective", unit="step") as bar:
    for name, method in table.items():
      bar.set_postfix_str(name)
      curves[name] = train(method, seeds, bar)
  final = {name: c[:, -1, :] for name, c in curves.items()}  # [seeds, K]
  summary = {}
  for name, f in final.items():
    cols = {obj: _interval(f[:, i]) for i, obj in enumerate(OBJECTIVES)}
    cols["mean of the three"] = _interval(f.mean(axis=1))
    summary[name] = {"held_out_ce": cols}
    base = name.removesuffix("+EMA")
    if name.endswith("+EMA"):
      diff = f.mean(axis=1) - final[base].mean(axis=1)
      summary[name]["ema_minus_no_ema"] = _interval(diff)
      summary[name]["ema_minus_no_ema_per_objective"] = [
        _interval(f[:, i] - final[base][:, i]) for i in range(3)
      ]
    if name != "mean":
      summary[name]["minus_mean"] = _interval(f.mean(axis=1) - final["mean"].mean(axis=1))
  report = {
    "protocol": {
      "data": "scikit-learn digits, 75/25 split; input A + 0.5 B, new partners B every epoch",
      "objectives": OBJECTIVES,
      "model": "MLP trunk 64-256-128 (ReLU), one linear head per objective",
      "optimizer": "Adam, lr 1e-3, 5% linear warm-up then cosine decay to 0",
      "batch": 64,
      "epochs": epochs,
      "steps": epochs * steps_per_epoch,
      "seeds": seeds,
      "ema_decay": EMA_DECAY,
      "scores": "held-out CE per objective at the end; paired-by-seed differences with"
      " 95% Student-t intervals",
    },
    "summary": summary,
    "curves": {name: c.tolist() for name, c in curves.items()},
  }
  (out / "multiobjective_digits.json").write_text(json.dumps(report))
  _plot_task(curves, epochs, out / "multiobjective_digits.png")
  return _format_task(summary, seeds, epochs * steps_per_epoch) + (
    f"\nwrote {out / 'multiobjective_digits.png'} and {out / 'multiobjective_digits.json'}\n"
  )


def _format_task(summary, seeds, steps):
  cell = lambda t: f"{t[0]:.4f} [{t[1]:.4f}, {t[2]:.4f}]"
  lines = [
    f"== three objectives on overlaid digits: held-out CE after {steps} steps,"
    f" mean [95% t interval] over {seeds} seeds",
    f"{'method':<21}" + "".join(f"{o:>28}" for o in [*OBJECTIVES, "mean of the three"]),
  ]
  for name, s in summary.items():
    cols = s["held_out_ce"]
    lines.append(f"{name:<21}" + "".join(f"{cell(cols[o]):>28}" for o in cols))
  lines.append("\n== paired by seed, on the mean of the three held-out CEs (negative = better)")
  lines.append(f"{'method':<21}{'minus mean':>40}{'EMA minus no EMA':>40}")
  for name, s in summary.items():
    if name == "mean":
      continue
    m = s["minus_mean"]
    left = f"{m[0]:+.4f} [{m[1]:+.4f}, {m[2]:+.4f}] {_verdict(m[1], m[2]):>6}"
    right = ""
    if "ema_minus_no_ema" in s:
      e = s["ema_minus_no_ema"]
      right = f"{e[0]:+.4f} [{e[1]:+.4f}, {e[2]:+.4f}] {_verdict(e[1], e[2]):>6}"
    lines.append(f"{name:<21}{left:>40}{right:>40}")
  return "\n".join(lines)


def _plot_task(curves, epochs, path):
  from matplotlib import colormaps
  from matplotlib.figure import Figure

  names = [*NAMES, "random", "mgda+CR-MOGM", "moco", "moco, tracking 0.99"]
  palette = colormaps["tab20"]
  fig = Figure(figsize=(16, 4.2))
  axes = fig.subplots(1, 4)
  for c, name in enumerate(names):
    for suffix, style in (("", "-"), ("+EMA", "--")):
      key = name + suffix
      if key not in curves:
        continue
      data = np.asarray(curves[key])  # [seeds, evals + 1, K]
      x = np.linspace(0, epochs, data.shape[1])
      series = [data[..., i] for i in range(3)] + [data.mean(axis=2)]
      color = palette(c % 20) if c < 20 else "black"
      for ax, values in zip(axes, series, strict=True):
        ax.plot(x, values.mean(axis=0), style, color=color, label=key, lw=1.2)
  for ax, title in zip(axes, [*OBJECTIVES, "mean of the three"], strict=True):
    ax.set_title(f"held-out CE: {title}", fontsize=9)
    ax.set_xlabel("epoch")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="center right", fontsize=7, ncol=2, frameon=False)
  fig.tight_layout(rect=(0, 0, 0.8, 1))
  fig.savefig(path, dpi=110)


# ------------------------------------------------------------ Monte Carlo

P = 100


def monte_carlo(sigmas, draws, chains, ema_decays=(0.9, 0.99), seed=0, progress=None):
  k = 3
  key_g, key_noise = jax.random.split(jax.random.key(seed))
  g = jax.random.normal(key_g, (k, P))
  g = g.at[1].set(-0.6 * g[0] + 0.8 * g[1])  # objectives 0 and 1 conflict
  out = {}

  def fresh_state(tx, kk):
    state = tx.init(g[0])  # PCGrad: a random visiting order per draw or chain
    if state.rng_key is not None:
      state = state._replace(rng_key=jax.random.key_data(kk))
    return state

  for name in NAMES[1:]:
    if name in STATEFUL:
      continue
    make = factory(name)
    clean = make(k)

    def weights_once(grads_now, kk, clean=clean):
      _, state = clean.update(tuple(grads_now[i] for i in range(k)), fresh_state(clean, kk))
      return state.objective_weights

    # The target: the decision on noise-free gradients (for PCGrad, its mean
    # over random visiting orders).
    target = jax.jit(
      lambda kk, f=weights_once: (
        jax.vmap(lambda q: f(g, q))(jax.random.split(kk, draws)).mean(axis=0) @ g
      )
    )(jax.random.fold_in(key_noise, 999))
    curves = {}

    @jax.jit
    def no_ema(sigma, key, f=weights_once):
      def one(kk):
        k_noise, k_order = jax.random.split(kk)
        return f(g + sigma * jax.random.normal(k_noise, (k, P)), k_order)

      return jax.vmap(one)(jax.random.split(key, draws)).mean(axis=0) @ g

    def with_ema(decay, make=make):
      tx = make(k, ema_decay=decay)
      steps = int(4 / (1 - decay))

      def chain(sigma, key):
        def step(state, kk):
          noisy = g + sigma * jax.random.normal(kk, (k, P))  # noqa: B023 (used at once)
          _, state = tx.update(tuple(noisy[i] for i in range(k)), state)
          return state, None

        k_run, k_order = jax.random.split(key)
        state, _ = jax.lax.scan(step, fresh_state(tx, k_order), jax.random.split(k_run, steps))
        return state.objective_weights

      return jax.jit(
        lambda s, kk: jax.vmap(chain, (None, 0))(s, jax.random.split(kk, chains)).mean(axis=0) @ g
      )

    fns = {"no EMA": no_ema, **{f"ema_decay={d:g}": with_ema(d) for d in ema_decays}}
    for label, fn in fns.items():
      errors = []
      for i, sigma in enumerate(sigmas):
        d = fn(jnp.float32(sigma), jax.random.fold_in(key_noise, i))
        errors.append(float(jnp.linalg.norm(d - target) / jnp.linalg.norm(target)))
      curves[label] = errors
      if progress is not None:
        progress.update(1)
    out[name] = curves
  return out


def run_monte_carlo(out: pathlib.Path, quick: bool) -> str:
  sigmas = np.logspace(-1, 1.5, 11)
  draws, chains = (500, 50) if quick else (4_000, 1_000)
  total = (len(NAMES) - 1 - len(STATEFUL)) * 3
  with tqdm(total=total, desc="monte carlo", unit="curve") as bar:
    curves = monte_carlo(sigmas, draws, chains, progress=bar)
  report = {
    "protocol": {
      "setup": f"K = 3, p = {P}, g_i ~ N(0, I) fixed, g_1 <- -0.6 g_0 + 0.8 g_1; batch"
      " gradients g_i + sigma N(0, I)",
      "sigmas": sigmas.tolist(),
      "draws_without_ema": draws,
      "chains_with_ema": chains,
      "chain_length": "4 / (1 - ema_decay) steps",
      "metric": "|E[w] g - d*| / |d*|: expected weights decided on batch gradients (or"
      " their EMAs), applied to the noise-free gradients g; d* = w(g) g",
    },
    "curves": curves,
  }
  (out / "multiobjective_monte_carlo.json").write_text(json.dumps(report))
  _plot_mc(sigmas, curves, out / "multiobjective_monte_carlo.png")
  labels = list(next(iter(curves.values())))
  lines = [
    "== Monte Carlo (Figure 2 per aggregator): bias of the decision |E[w] g - d*| / |d*|,"
    " K = 3, p = 100"
  ]
  lines.append(f"{'sigma':>22}" + "".join(f"{s:>8.3g}" for s in sigmas))
  for name, c in curves.items():
    for lab in labels:
      lines.append(f"{name + ' ' + lab:>22}" + "".join(f"{v:>8.3f}" for v in c[lab]))
  lines.append(f"wrote {out / 'multiobjective_monte_carlo.png'}\n")
  return "\n".join(lines)


def _plot_mc(sigmas, curves, path):
  from matplotlib.figure import Figure

  rows = -(-len(curves) // 3)
  fig = Figure(figsize=(13, 3 * rows))
  axes = fig.subplots(rows, 3).ravel()
  for ax in axes[len(curves) :]:
    ax.set_visible(False)
  for ax, (name, c) in zip(axes, curves.items(), strict=False):
    for j, (label, values) in enumerate(c.items()):
      ax.plot(sigmas, values, marker="o", ms=3, color=f"C{j}", label=label)
    ax.set_xscale("log")
    ax.set_title(name)
    ax.set_xlabel("batch-gradient noise σ")
    ax.set_ylabel("|E[w] g - d*| / |d*|")
    ax.grid(alpha=0.3, which="both")
  axes[0].legend(fontsize=8)
  fig.suptitle("Deciding on noisy gradients biases every aggregator; an EMA reduces the bias")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  parser = argparse.ArgumentParser(
    description="K objectives of equal standing: every aggregator with and without an EMA.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument(
    "--part", choices=["task", "monte_carlo", "all"], default="all", help="which experiment to run"
  )
  parser.add_argument("--seeds", type=int, default=5, help="seeds of the digits task (>= 2)")
  parser.add_argument("--epochs", type=int, default=60, help="epochs of the digits task")
  parser.add_argument(
    "--quick",
    action="store_true",
    help="2 epochs and few Monte Carlo draws: a smoke test, not a result",
  )
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    default=pathlib.Path("results"),
    help="folder for the plots and JSON",
  )
  args = parser.parse_args(argv)
  if args.seeds < 2:
    parser.error(f"--seeds must be at least 2 for an interval; got {args.seeds}")
  args.out.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  if args.part in ("task", "all"):
    epochs = 2 if args.quick else args.epochs
    print(run_task(args.out, args.seeds, epochs))
  if args.part in ("monte_carlo", "all"):
    print(run_monte_carlo(args.out, args.quick))
  print(f"done in {time.perf_counter() - start:.0f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
