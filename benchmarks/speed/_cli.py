"""The command line of ``python -m benchmarks.speed``: one table per run."""

import argparse
import json
import os
import pathlib
import sys


def main(argv=None):
  parser = argparse.ArgumentParser(
    description="Speed and memory of the surgery against the alternatives, as ratios.",
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
    "--out",
    type=pathlib.Path,
    default=pathlib.Path(__file__).parent.parent / "results",
    help="folder for the JSON results",
  )
  args = parser.parse_args(argv)
  if args.devices:
    # Must happen before JAX starts: run the scaling table in this process only.
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  # The tables import JAX: only now that the device count is set.
  from benchmarks.speed import _common as common
  from benchmarks.speed import aggregators
  from benchmarks.speed import full_step
  from benchmarks.speed import optimizer
  from benchmarks.speed import scaling

  sys.path.insert(0, str(pathlib.Path(__file__).parent.parent.parent))
  args.out.mkdir(parents=True, exist_ok=True)
  rounds, inner = (3, 2) if args.quick else (15, 5)
  report = {"machine": common.machine(), "rounds": rounds, "calls_per_round": inner}
  g = lambda x: f"{x:.3g}"
  r3 = lambda x: f"{x:.3f}"
  r2 = lambda x: f"{x:.2f}"
  quick = args.quick
  ks = [16] if quick else args.objectives
  # flag -> (report key, rows, title, columns (name, width, format), file stem)
  sections = {
    "devices": (
      "scaling",
      lambda: scaling.scaling([2**14, 2**17] if quick else [2**17, 2**20, 2**22], rounds, inner),
      "== N devices, params sharded: time per step against mixed + adam",
      [
        ("params_per_device", 18, str),
        ("variant", 14, str),
        ("seconds", 12, g),
        ("ratio_to_mixed_adam", 20, r3),
        ("collectives", 60, lambda ops: ", ".join(f"{o} {s}" for o, s in ops) or "none"),
      ],
      "speed_scaling",
    ),
    "many_objectives": (
      "many_objectives",
      lambda: aggregators.many_objectives(ks, [2**14] if quick else [2**18, 2**20], rounds, inner),
      "== aggregator + adam at many objectives, ratios to mean + adam (8 leaves)",
      [
        ("params", 10, str),
        ("objectives", 11, str),
        ("variant", 14, str),
        ("compile_seconds", 16, lambda x: f"{x:.1f}"),
        ("seconds", 11, g),
        ("ratio_to_mean_adam", 20, r3),
        ("rule_seconds", 13, g),
      ],
      "speed_many_objectives" + ("" if ks == [16, 64] else "_k" + "_".join(map(str, ks))),
    ),
    "full_step": (
      "full_step",
      lambda: full_step.full_step(rounds, inner),
      "== whole training step, ratios to the Mixed step (one jax.grad of main + lam aux, adam)",
      [
        ("model", 25, str),
        ("params", 9, str),
        ("variant", 40, str),
        ("seconds", 11, g),
        ("ratio_to_mixed", 15, r3),
      ],
      "speed_full_step",
    ),
    "aggregators": (
      "aggregators",
      lambda: aggregators.aggregator_step(
        [2, 4, 8], [2**16] if quick else [2**20, 2**22], rounds, inner
      ),
      "== aggregator + adam, ratios to mean + adam (8 leaves)",
      [
        ("params", 10, str),
        ("objectives", 11, str),
        ("variant", 20, str),
        ("seconds", 11, g),
        ("ratio_to_mean_adam", 20, r3),
        ("bytes_per_param_executed", 25, r2),
        ("fusions_executed", 17, str),
      ],
      "speed_aggregators",
    ),
    "optimizer_step": (
      "optimizer_step",
      lambda: optimizer.optimizer_step(
        [2**16, 2**18] if quick else [2**20, 2**23, 2**25], [8, 200], rounds, inner
      ),
      "== optimizer step (tx.update + apply_updates)",
      [
        ("params", 10, str),
        ("leaves", 7, str),
        ("variant", 27, str),
        ("seconds", 10, g),
        ("ratio_to_mixed_adam", 20, r3),
        ("ratio_to_naive", 15, r3),
        ("bytes_per_param_executed", 25, r2),
        ("fusions_executed", 17, str),
        ("bytes_per_param_all_code", 25, r2),
        ("temp_bytes", 12, str),
      ],
      "speed",
    ),
  }
  chosen = next(
    (
      flag
      for flag in ("devices", "many_objectives", "full_step", "aggregators")
      if getattr(args, flag)
    ),
    "optimizer_step",
  )
  key, rows, title, columns, stem = sections[chosen]
  report[key] = rows()
  print(title)
  print(common.table(report[key], columns))
  name = f"{stem}_{report['machine']['backend']}.json"
  if args.quick:
    name = name.replace(".json", "_quick.json")
  (args.out / name).write_text(json.dumps(report, indent=1))
  print(f"\nmachine: {report['machine']}\nwrote {args.out / name}")
  return 0
