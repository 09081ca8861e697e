r"""The whole multi-task training step at K = 2 .. 64 tasks, ours and TorchJD's.

The step a multi-task user writes: a shared MLP trunk 64 -> 512 -> 512 (ReLU)
with K linear two-class heads, batch 256, one cross-entropy per head; the K
gradients from one forward pass (``bloop_optax.value_and_grads``), an
aggregator of the shared parameters' gradients (``aggregators.on_shared``:
each head gets its own task's gradient), Adam, all in one jitted step with the
parameters and the optimizer state donated. For every Gram-based aggregator
and ``mean``, and the plain sum of the losses (one backward pass, Adam), it
records the milliseconds per step (interleaved rounds, the minimum over rounds
of each round's median), the ratio to our ``mean`` step, the seconds to trace
and compile the step, and XLA's cost figures of the compiled step (bytes
accessed and flops from ``cost_analysis()``, which counts both sides of the
overflow branch, and the number of fusions).

Where threadpoolctl is installed (with scikit-learn), each round also times
each of our steps with the BLAS and LAPACK libraries of the process on one
thread (``ms_blas1``; ``--no-blas-limit`` skips it): jax's CPU
eigendecompositions run in scipy's OpenBLAS, whose threads keep spinning after
a call and slow the rest of the step down.

``<rule>:features`` (by default for ``mean``, ``mgda`` and ``upgrad``) is the same
step with MGDA-UB's features Jacobian: the weights are decided from the K
gradients of the losses with respect to the trunk's output, and the direction
there is pulled back through the trunk in one backward pass (``jax.vjp``), each
head getting its own task's gradient.

Where PyTorch and TorchJD are installed in a second environment, the same step
written as TorchJD's documentation writes it (``mtl_backward(losses,
features=...)``, ``jac_to_grad(trunk parameters, aggregator)``,
``Adam.step``; 2 threads) is measured in the same run, K by K, right after
ours. Set it up once:

  python3 -m venv .venv-torchjd
  .venv-torchjd/bin/pip install torch "torchjd[full]==0.18.0"
  python -m benchmarks.multitask_step --torchjd-python .venv-torchjd/bin/python

``--tasks 2,4,8`` and ``--rules upgrad,mgda`` choose a subset; ``--out``
writes ``multitask_step.json`` and the plot of time against K.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import time

import numpy as np

BATCH, IN, WIDTH = 256, 64, 512
TORCHJD_NAMES = {  # ours -> TorchJD's aggregator and its arguments ("n_tasks": K)
  "sum": None,
  "mean": ("Mean", {}),
  "mgda": ("MGDA", {}),
  "pcgrad": ("PCGrad", {}),
  "cagrad": ("CAGrad", {"c": 0.5}),
  "imtl_g": ("IMTLG", {}),
  "aligned_mtl": ("AlignedMTL", {}),
  "upgrad": ("UPGrad", {}),
  "dualproj": ("DualProj", {}),
  "config": ("ConFIG", {}),
  "krum": ("Krum", {"n_byzantine": 0, "n_selected": 1}),
  "nash_mtl": ("NashMTL", {"n_tasks": None}),
  "fairgrad": ("FairGrad", {"alpha": 2.0}),
  "gradvac": ("GradVac", {}),
}


def data(k, seed=0):
  """Inputs and K binary labels from random linear teachers (numpy, shared by
  both sides)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((BATCH, IN)).astype(np.float32)
  teachers = rng.standard_normal((IN, k)).astype(np.float32)
  y = (x @ teachers > 0).astype(np.int32)
  return x, y


# ------------------------------------------------------------------ ours


def our_rules():
  from bloop_optax.aggregators import _catalogue

  gram = [e.name for e in _catalogue.gram_based()]
  return ["sum", "mean", *gram, "mean:features", "mgda:features", "upgrad:features"]


def our_step(name, k):
  """``(jitted step, init() -> carry)`` of our whole step for ``name``."""
  import jax
  import jax.numpy as jnp
  import optax

  import bloop_optax
  from bloop_optax import aggregators
  from bloop_optax.aggregators import _catalogue

  x_np, y_np = data(k)
  x, y = jnp.asarray(x_np), jnp.asarray(y_np)
  keys = jax.random.split(jax.random.key(0), 2 + k)

  def dense(key, n_in, n_out):
    w = jax.random.normal(key, (n_in, n_out)) * jnp.sqrt(2.0 / n_in)
    return {"w": w, "b": jnp.zeros(n_out)}

  params = {
    "trunk": [dense(keys[0], IN, WIDTH), dense(keys[1], WIDTH, WIDTH)],
    "heads": [dense(keys[2 + i], WIDTH, 2) for i in range(k)],
  }

  def trunk(layers, x):
    h = x
    for layer in layers:
      h = jax.nn.relu(h @ layer["w"] + layer["b"])
    return h

  def head_losses(heads, h, y):
    out = []
    for i, head in enumerate(heads):
      logits = h @ head["w"] + head["b"]
      out.append(-jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, i : i + 1], 1)))
    return tuple(out)

  def losses(p, x, y):
    return head_losses(p["heads"], trunk(p["trunk"], x), y)

  def inner_of(rule):
    options = {"key": 0} if rule in ("pcgrad", "gradvac") else {}
    return aggregators.mean(k) if rule == "mean" else _catalogue.BY_NAME[rule].make(k, **options)

  adam = optax.adam(1e-3)
  if name.endswith(":features"):
    agg = aggregators.on_shared(inner_of(name.split(":")[0]), {"features": True, "heads": False})

    def step(p, s, x, y):
      agg_state, adam_state = s
      h, pullback = jax.vjp(lambda t: trunk(t, x), p["trunk"])
      _, grads = bloop_optax.value_and_grads(lambda f: head_losses(f["heads"], f["features"], y))(
        {"features": h, "heads": p["heads"]}
      )
      direction, agg_state = agg.update(grads, agg_state)
      (trunk_direction,) = pullback(direction["features"])
      updates = {"trunk": trunk_direction, "heads": direction["heads"]}
      updates, adam_state = adam.update(updates, adam_state, p)
      return optax.apply_updates(p, updates), (agg_state, adam_state)

    def init():
      features = jnp.zeros((BATCH, WIDTH))
      state = agg.init({"features": features, "heads": params["heads"]}), adam.init(params)
      return jax.tree.map(jnp.copy, params), state, x, y

    return step, init

  if name == "sum":
    tx = adam

    def step(p, s, x, y):
      grads = jax.grad(lambda p: sum(losses(p, x, y)))(p)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s

  else:
    tx = optax.chain(aggregators.on_shared(inner_of(name), {"trunk": True, "heads": False}), adam)

    def step(p, s, x, y):
      _, grads = bloop_optax.value_and_grads(losses)(p, x, y)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s

  def init():
    return jax.tree.map(jnp.copy, params), tx.init(params), x, y

  return step, init


def blas_limit():
  """A context that runs the BLAS and LAPACK libraries loaded in this process
  (scipy's OpenBLAS, where jax's CPU eigendecompositions run) on one thread;
  ``None`` where threadpoolctl (installed with scikit-learn) is missing."""
  try:
    import threadpoolctl
  except ImportError:
    return None
  return lambda: threadpoolctl.threadpool_limits(1, user_api="blas")


def measure_ours(names, k, rounds, limit=None):
  """Our steps' rows. With ``limit`` (:func:`blas_limit`), each round also
  times each step with one BLAS thread (``ms_blas1``), right after its default
  timing."""
  import contextlib

  import jax

  from benchmarks.speed._common import hlo_stats

  rows, compiled = {}, {}
  for name in names:
    if name == "krum" and k < 3:
      continue
    step, init = our_step(name, k)
    start = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(*init())
    executable = lowered.compile()
    seconds = time.perf_counter() - start
    analysis = executable.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    count = sum(x.size for x in jax.tree.leaves(init()[0]))
    stats = hlo_stats(lowered, count)
    rows[name] = {
      "compile_s": seconds,
      "bytes_accessed": float(analysis.get("bytes accessed", 0.0)),
      "flops": float(analysis.get("flops", 0.0)),
      "fusions": stats["fusions"],
    }
    compiled[name] = (executable, init)
  modes = {"ms": contextlib.nullcontext}
  if limit is not None:
    modes["ms_blas1"] = limit
  samples = {(name, mode): [] for name in compiled for mode in modes}
  carries = {name: init() for name, (_, init) in compiled.items()}
  for name, (executable, _) in compiled.items():  # warm up
    p, s, x, y = carries[name]
    carries[name] = (*executable(p, s, x, y), x, y)
  for _ in range(rounds):
    for name, (executable, _) in compiled.items():
      for mode, context in modes.items():
        times = []
        with context():
          for _ in range(5):
            p, s, x, y = carries[name]
            start = time.perf_counter()
            p, s = executable(p, s, x, y)
            jax.block_until_ready(p)
            times.append(time.perf_counter() - start)
            carries[name] = (p, s, x, y)
        samples[name, mode].append(float(np.median(times)))
  for name, mode in samples:
    rows[name][mode] = 1e3 * min(samples[name, mode])
  return rows


# --------------------------------------------------------------- TorchJD


def measure_torchjd(names, k, rounds):
  """Run inside the TorchJD environment: ms per step for each name."""
  import torch
  from torchjd import aggregation as tj
  from torchjd.autojac import jac_to_grad
  from torchjd.autojac import mtl_backward

  torch.set_num_threads(2)
  torch.manual_seed(0)
  x_np, y_np = data(k)
  x, y = torch.from_numpy(x_np), torch.from_numpy(y_np.astype(np.int64))
  out = {}
  for name in names:
    if name not in TORCHJD_NAMES or (name == "krum" and k < 3):
      continue
    trunk = torch.nn.Sequential(
      torch.nn.Linear(IN, WIDTH), torch.nn.ReLU(), torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU()
    )
    heads = torch.nn.ModuleList([torch.nn.Linear(WIDTH, 2) for _ in range(k)])
    optimizer = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=1e-3)
    aggregator = None
    if TORCHJD_NAMES[name] is not None:
      cls, kwargs = TORCHJD_NAMES[name]
      kwargs = {key: k if value is None else value for key, value in kwargs.items()}
      aggregator = getattr(tj, cls)(**kwargs)

    def step(trunk=trunk, heads=heads, optimizer=optimizer, aggregator=aggregator):
      features = trunk(x)
      losses = [
        torch.nn.functional.cross_entropy(head(features), y[:, i]) for i, head in enumerate(heads)
      ]
      optimizer.zero_grad()
      if aggregator is None:
        sum(losses).backward()
      else:
        mtl_backward(losses, features=features)
        jac_to_grad(list(trunk.parameters()), aggregator)
      optimizer.step()

    for _ in range(3):
      step()
    medians = []
    for _ in range(rounds):
      times = []
      for _ in range(5):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
      medians.append(float(np.median(times)))
    out[name] = 1e3 * min(medians)
  return out


# ------------------------------------------------------------------ main


def plot(results, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ks = sorted(int(k) for k in results["ours"])
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  shown = ["sum", "mean", "upgrad", "mgda", "nash_mtl", "upgrad:features"]
  for i, name in enumerate(shown):
    color = f"C{i}"
    ours = [results["ours"][str(k)].get(name, {}).get("ms") for k in ks]
    if all(t is None for t in ours):  # a rule this run did not measure
      continue
    axes[0].plot(ks, ours, "o-", color=color, label=f"ours: {name}")
    theirs = [results.get("torchjd", {}).get(str(k), {}).get(name) for k in ks]
    if any(t is not None for t in theirs):
      axes[0].plot(ks, theirs, "s--", color=color, alpha=0.7, label=f"TorchJD: {name}")
  axes[0].set(xscale="log", yscale="log", xlabel="tasks K", ylabel="ms per step")
  axes[0].minorticks_off()
  axes[0].set_xticks(ks, [str(k) for k in ks])
  axes[0].legend(fontsize=7, ncol=2)
  axes[0].set_title("Whole step (trunk + K heads, batch 256, Adam)")
  names = [n for n in results["ours"][str(ks[0])] if n != "sum"]
  styles = ["-", "--", ":"]
  for i, name in enumerate(names):
    compile_s = [results["ours"][str(k)].get(name, {}).get("compile_s") for k in ks]
    axes[1].plot(ks, compile_s, marker=".", linestyle=styles[i // 10], alpha=0.8, label=name)
  axes[1].set(xscale="log", xlabel="tasks K", ylabel="seconds", title="Trace and compile")
  axes[1].minorticks_off()
  axes[1].set_xticks(ks, [str(k) for k in ks])
  axes[1].legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def table(results):
  lines = []
  for k, rows in results["ours"].items():
    theirs = results.get("torchjd", {}).get(k, {})
    mean = rows.get("mean", {}).get("ms")
    lines.append(f"K = {k}")
    mean_1 = rows.get("mean", {}).get("ms_blas1")
    lines.append(
      f"{'rule':>12} {'ms':>8} {'x mean':>7} {'1 BLAS thread':>14} {'TorchJD ms':>11}"
      f" {'ours/TJD':>9} {'compile s':>10} {'MB':>8} {'GFLOP':>7} {'fusions':>8}"
    )
    for name, row in rows.items():
      tj_ms = theirs.get(name)
      ratio = f"{row['ms'] / tj_ms:9.2f}" if tj_ms else f"{'-':>9}"
      tj = f"{tj_ms:11.1f}" if tj_ms else f"{'-':>11}"
      one = row.get("ms_blas1")
      one = f"{one:7.1f} x{one / mean_1:4.2f}" if one and mean_1 else f"{'-':>14}"
      lines.append(
        f"{name:>12} {row['ms']:8.1f} {row['ms'] / mean:7.2f} {one:>14} {tj} {ratio}"
        f" {row['compile_s']:10.1f} {row['bytes_accessed'] / 1e6:8.0f}"
        f" {row['flops'] / 1e9:7.2f} {row['fusions']:8d}"
      )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tasks", default="2,4,8,16,40,64")
  parser.add_argument("--rules", default=None, help="comma-separated; default: all")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--torchjd-python", default=None, help="python of a TorchJD environment")
  parser.add_argument("--out", default="results")
  parser.add_argument("--stem", default="multitask_step", help="name of the .json and .png")
  parser.add_argument(
    "--no-blas-limit",
    action="store_true",
    help="do not also time our steps with one BLAS thread",
  )
  parser.add_argument("--torchjd-worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  ks = [int(k) for k in args.tasks.split(",")]
  names = args.rules.split(",") if args.rules else None
  if args.torchjd_worker:
    print(json.dumps({k: measure_torchjd(names, k, args.rounds) for k in ks}))
    return
  from benchmarks.speed._common import machine

  names = names or our_rules()
  results = {"machine": machine(), "ours": {}, "torchjd": {}, "rules": names}
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  limit = None if args.no_blas_limit else blas_limit()
  for k in ks:
    results["ours"][str(k)] = measure_ours(names, k, args.rounds, limit)
    if args.torchjd_python:
      command = [
        args.torchjd_python, "-m", "benchmarks.multitask_step", "--torchjd-worker",
        "--tasks", str(k), "--rules", ",".join(names), "--rounds", str(args.rounds),
      ]  # fmt: skip
      done = subprocess.run(command, capture_output=True, text=True, check=True)
      results["torchjd"][str(k)] = json.loads(done.stdout.strip().splitlines()[-1])[str(k)]
    print(table({"ours": {str(k): results["ours"][str(k)]}, "torchjd": results["torchjd"]}))
    (out / f"{args.stem}.json").write_text(json.dumps(results, indent=1))
  plot(results, out / f"{args.stem}.png")
  print(f"wrote {out / args.stem}.json and .png", file=sys.stderr)


if __name__ == "__main__":
  main()
