"""Reproduces the paper's findings at small scale: Pareto fronts of main vs aux.

Usage (from the repository root)::

  python -m benchmarks.experiments                 # the default task: digits
  python -m benchmarks.experiments --task all      # every task
  python -m benchmarks.experiments --task digits --out benchmarks/results  # the committed files

Each training task trains its methods (``mixed``, ``dynamic_barrier``,
``pcgrad`` and ``bloop`` for the paper's comparisons) over a grid of aux
weights and seeds, one compiled, vmapped program per method, on the same
grid, schedule, steps and seeds for every method. It prints the final values,
the matched-loss tables (the headline) and the Pareto hypervolumes, and writes
``<out>/<task>.png`` and ``<out>/<task>.json`` (every number and the
protocol). By default ``<out>`` is ``results/`` at the repository root, which
git ignores.
"""

import argparse
import json
import pathlib
import sys

import numpy as np

from benchmarks import harness
from benchmarks import monte_carlo
from benchmarks import pareto
from benchmarks import tasks

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "results"

TRAINING_TASKS = {
  "quadratics": lambda scale, quick: tasks.quadratics(20 if quick else 1000 * scale),
  "quadratics_cyclic": lambda scale, quick: tasks.quadratics(
    20 if quick else 1000 * scale, cyclic=True
  ),
  "digits": lambda scale, quick: tasks.smooth_mlp(tasks.DIGITS_EPOCHS * scale, quick=quick),
  "multitask": lambda scale, quick: tasks.multitask(tasks.MULTITASK_EPOCHS * scale, quick=quick),
  "ema_ablation": lambda scale, quick: tasks.ema_ablation(tasks.DIGITS_EPOCHS * scale, quick=quick),
  "three_objectives": lambda scale, quick: tasks.three_objectives(
    tasks.DIGITS_EPOCHS * scale, quick=quick
  ),
}


def _text_task(scale, quick):
  from benchmarks import text  # imports flax only when asked for

  return text.joint_text(text.EPOCHS * scale, quick=quick)


TRAINING_TASKS["text"] = _text_task
ALL_TASKS = [*TRAINING_TASKS, "monte_carlo"]


def _compact(values: np.ndarray) -> list:
  """Nested lists of floats with 5 significant digits (NaN becomes None)."""
  values = np.asarray(values, np.float64)
  rounded = [float(f"{v:.5g}") if np.isfinite(v) else None for v in values.ravel()]
  return np.array(rounded, dtype=object).reshape(values.shape).tolist()


def mixed_objective(results: dict, task: harness.Task, points: int = 11) -> dict:
  """The paper's Figure 6 view: per method, the lowest final
  ``(1 - t) L_main + t L_aux`` over the aux weights, for t in [0, 1] (means
  over seeds; train and held-out)."""
  ts = np.linspace(0.0, 1.0, points)
  out = {"t": ts.tolist(), "methods": {}}
  for name, metrics in results.items():
    entry = {}
    for panel in pareto.PANELS:
      main, aux = pareto.PANELS[panel]
      aux = aux if aux in metrics else "aux"
      m = np.asarray(metrics[main][..., -1], np.float64)  # [weights, seeds]
      a = np.asarray(metrics[aux][..., -1], np.float64)
      mixed = (1 - ts[:, None, None]) * m + ts[:, None, None] * a
      best = np.nanmin(mixed, axis=1)  # over aux weights, per seed
      entry[panel] = {"mean": best.mean(axis=1).tolist(), "std": best.std(axis=1).tolist()}
    out["methods"][name] = entry
  return out


def _to_json(results, task: harness.Task, summary, seconds: dict, seeds: int) -> dict:
  return {
    "task": task.name,
    "protocol": {
      **task.protocol,
      "optimisation_steps": task.total_steps,
      "batch_size": task.batch_size,
      "epochs": task.epochs,
      "aux_weights": list(task.aux_weights),
      "seeds": seeds,
      "methods": list(results),
    },
    "aux_weights": list(task.aux_weights),
    # the methods that sweep their own values (PCD's tau) instead of aux_weights
    "grids": {m: list(task.grid(m)) for m in results if m in task.grids},
    "epochs": task.epochs,
    "eval_every": task.eval_every,
    "batch_size": task.batch_size,
    "scales": list(task.scales),
    "chance": task.chance,
    "seconds": sum(seconds.values()),
    "seconds_by_method": seconds,
    "scores": summary,
    # method -> metric -> [aux_weight][seed][evaluation]
    "metrics": {m: {k: _compact(v) for k, v in r.items()} for m, r in results.items()},
  }


def _reused(
  path: pathlib.Path, task: harness.Task, seeds: int, skip: list[str]
) -> tuple[dict, dict]:
  """The metrics of the methods not in ``skip`` from an earlier run's JSON,
  which must come from the same protocol (steps, grid, evaluations, seeds),
  and their training seconds (a file that does not record them per method
  gives its whole time, under a key that says so)."""
  data = json.loads(path.read_text())
  same = (
    data["epochs"] == task.epochs
    and data["eval_every"] == task.eval_every
    and data["aux_weights"] == list(task.aux_weights)
    and data["protocol"]["seeds"] == seeds
  )
  if not same:
    raise SystemExit(f"{path} comes from another protocol than {task.name} with {seeds} seeds")
  as_array = np.vectorize(lambda v: np.nan if v is None else v, otypes=[np.float64])
  out = {}
  for method, metrics in data["metrics"].items():
    if method in task.methods and method not in skip:
      out[method] = {k: as_array(np.array(x, dtype=object)) for k, x in metrics.items()}
  by_method = data.get("seconds_by_method")
  if by_method is None:
    return out, {"earlier run, every method it held": float(data["seconds"])}
  return out, {m: t for m, t in by_method.items() if m in out}


def run_training_task(
  name: str,
  seeds: int,
  scale: int,
  quick: bool,
  out: pathlib.Path,
  methods: list[str] | None = None,
  reuse: pathlib.Path | None = None,
):
  task = TRAINING_TASKS[name](scale, quick)
  if scale != 1:
    task = harness.dataclasses.replace(task, name=f"{task.name}_{scale}x_steps")
  methods = [m for m in task.methods if methods is None or m in methods]
  seconds: dict[str, float] = {}
  results = harness.run_task(task, seeds, methods, seconds)
  if reuse is not None:
    # the training time recorded is that of every method, old and new
    kept, earlier = _reused(reuse / f"{task.name}.json", task, seeds, methods)
    results, seconds = {**kept, **results}, {**earlier, **seconds}
    results = {m: results[m] for m in task.methods if m in results}
  summary = pareto.compare(results, task.scales, task.chance, tuple(task.grids))
  if name == "text":
    summary["mixed_objective"] = mixed_objective(results, task)
  print(pareto.format_tables(task, results, summary))
  if name == "text":
    print(format_mixed_objective(summary["mixed_objective"]))
  print(
    f"({len(methods)} methods trained x {len(task.aux_weights)} values x {seeds} seeds,"
    f" {task.total_steps} steps of batch {task.batch_size},"
    f" {sum(seconds.values()):.0f} s of training"
    f"{', reused runs included' if reuse is not None else ''})"
  )
  png, js = out / f"{task.name}.png", out / f"{task.name}.json"
  pareto.plot(task, results, summary, str(png))
  if name == "text":
    _plot_mixed_objective(summary["mixed_objective"], str(out / f"{task.name}_figure6.png"))
  js.write_text(json.dumps(_to_json(results, task, summary, seconds, seeds)))
  print(f"wrote {png} and {js}\n")
  return results, summary


def format_mixed_objective(table: dict) -> str:
  lines = ["== lowest final (1 - t) L_main + t L_aux over the aux weights (Figure 6), mean"]
  header = f"{'t':>6}" + "".join(
    f"{name + ' ' + p:>26}" for name in table["methods"] for p in ("train", "held-out")
  )
  lines += [header, "-" * len(header)]
  for j, t in enumerate(table["t"]):
    cells = "".join(
      f"{entry[p]['mean'][j]:>26.4f}" for entry in table["methods"].values() for p in pareto.PANELS
    )
    lines.append(f"{t:>6.2f}{cells}")
  return "\n".join(lines)


def _plot_mixed_objective(table: dict, path: str) -> None:
  import matplotlib
  from matplotlib.figure import Figure

  fig = Figure(figsize=(11, 4.2))
  axes = fig.subplots(1, 2)
  colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  ts = np.asarray(table["t"])
  for ax, panel in zip(axes, pareto.PANELS, strict=True):
    base = np.asarray(table["methods"]["mixed"][panel]["mean"])
    for c, (name, entry) in enumerate(table["methods"].items()):
      ax.plot(
        ts, np.asarray(entry[panel]["mean"]) - base, color=colors[c], marker="o", ms=3, label=name
      )
    where = "train" if panel == "train" else "held-out"
    ax.set_xlabel("t")
    ax.set_ylabel("best (1-t) L_main + t L_aux, minus Mixed's")
    ax.set_title(f"{where}: min over aux weights; below 0 beats Mixed", fontsize=10)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument(
    "--task",
    default="digits",
    choices=[*ALL_TASKS, "all"],
    help="which experiment; 'digits' is the paper's Figure 3a, 'all' runs every one in turn",
  )
  parser.add_argument(
    "--seeds", type=int, default=5, help="seeds per (method, aux weight); intervals need >= 2"
  )
  parser.add_argument(
    "--steps-multiplier",
    type=int,
    default=1,
    help="train for this many times the task's optimisation steps (same schedule shape);"
    " outputs get a _<k>x_steps suffix",
  )
  parser.add_argument(
    "--quick",
    action="store_true",
    help="a few steps and a small grid, for smoke tests: the numbers mean nothing",
  )
  parser.add_argument(
    "--methods",
    type=lambda text: text.split(","),
    default=None,
    help="train only these methods (comma-separated names of the task's methods; '' trains"
    " none, which with --reuse recomputes the scores and plot from the saved metrics)",
  )
  parser.add_argument(
    "--reuse",
    type=pathlib.Path,
    default=None,
    help="with --methods: take every other method's metrics from this folder's JSON of the"
    " same task (e.g. benchmarks/results), which must come from the same protocol",
  )
  parser.add_argument(
    "--out",
    type=pathlib.Path,
    default=DEFAULT_OUT,
    help="folder for the PNG and JSON files (the default is git-ignored; the committed"
    " results live in benchmarks/results)",
  )
  args = parser.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  print(f"writing results to {args.out.resolve()}")
  names = ALL_TASKS if args.task == "all" else [args.task]
  for name in names:
    if name == "monte_carlo":
      print(monte_carlo.run(args.out, quick=args.quick))
    else:
      run_training_task(
        name, args.seeds, args.steps_multiplier, args.quick, args.out, args.methods, args.reuse
      )
  return 0


if __name__ == "__main__":
  sys.exit(main())
