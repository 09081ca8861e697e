"""Reproduces the paper's findings at small scale: Pareto fronts of main vs aux.

Usage (from the repository root)::

  python -m benchmarks.experiments                 # the default task: digits
  python -m benchmarks.experiments --task all      # every task
  python -m benchmarks.experiments --task quadratics --seeds 5

Each training task trains ``mixed``, ``dynamic_barrier``, ``pcgrad`` and
``bloop`` over a grid of aux weights and seeds (one compiled, vmapped program
per method), prints the final values and the Pareto hypervolumes, and writes
``<out>/<task>.png`` (the fronts) and ``<out>/<task>.json`` (every number).
"""

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from benchmarks import harness
from benchmarks import monte_carlo
from benchmarks import pareto
from benchmarks import tasks

DEFAULT_OUT = pathlib.Path(__file__).parent / "results"

TRAINING_TASKS = {
  "quadratics": lambda epochs, quick: tasks.quadratics(epochs or (20 if quick else 1000)),
  "quadratics_cyclic": lambda epochs, quick: tasks.quadratics(
    epochs or (20 if quick else 1000), cyclic=True
  ),
  "digits": lambda epochs, quick: tasks.smooth_mlp(epochs or (2 if quick else 100)),
  "multitask": lambda epochs, quick: tasks.multitask(epochs or (2 if quick else 60)),
  "ema_ablation": lambda epochs, quick: tasks.ema_ablation(epochs or (2 if quick else 100)),
  "three_objectives": lambda epochs, quick: tasks.three_objectives(epochs or (2 if quick else 100)),
}


def _text_task(epochs, quick):
  from benchmarks import text  # imports flax only when asked for

  return text.joint_text(epochs or (1 if quick else 8), quick=quick)


TRAINING_TASKS["text"] = _text_task
ALL_TASKS = [*TRAINING_TASKS, "monte_carlo"]


def _compact(values: np.ndarray) -> list:
  """Nested lists of floats with 5 significant digits (NaN becomes None)."""
  values = np.asarray(values, np.float64)
  rounded = [float(f"{v:.5g}") if np.isfinite(v) else None for v in values.ravel()]
  return np.array(rounded, dtype=object).reshape(values.shape).tolist()


def _to_json(results: dict, task: harness.Task, summary: dict, seconds: float) -> dict:
  return {
    "task": task.name,
    "aux_weights": list(task.aux_weights),
    "epochs": task.epochs,
    "batch_size": task.batch_size,
    "scales": list(task.scales),
    "seconds": seconds,
    "hypervolume": summary,
    # method -> metric -> [aux_weight][seed][epoch]
    "metrics": {m: {k: _compact(v) for k, v in r.items()} for m, r in results.items()},
  }


def run_training_task(name: str, seeds: int, epochs: int | None, quick: bool, out: pathlib.Path):
  task = TRAINING_TASKS[name](epochs, quick)
  start = time.perf_counter()
  results = harness.run_task(task, seeds)
  seconds = time.perf_counter() - start
  summary = pareto.compare(results, task.scales)
  print(pareto.format_tables(task, results, summary))
  print(
    f"({len(task.methods)} methods x {len(task.aux_weights)} aux weights x {seeds} seeds,"
    f" {task.epochs} epochs, {seconds:.0f} s)"
  )
  png, js = out / f"{task.name}.png", out / f"{task.name}.json"
  pareto.plot(task, results, str(png))
  js.write_text(json.dumps(_to_json(results, task, summary, seconds)))
  print(f"wrote {png} and {js}\n")
  return results, summary


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--task", default="digits", choices=[*ALL_TASKS, "all"])
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--epochs", type=int, default=None, help="override the task's epochs")
  parser.add_argument("--quick", action="store_true", help="a few epochs, for smoke tests")
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
  args = parser.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  names = ALL_TASKS if args.task == "all" else [args.task]
  for name in names:
    if name == "monte_carlo":
      print(monte_carlo.run(args.out, quick=args.quick))
    else:
      run_training_task(name, args.seeds, args.epochs, args.quick, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
