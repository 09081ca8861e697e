"""Pareto fronts of (main, aux) end points, their hypervolume, tables and plots.

The comparison: for every method and seed, the end points over the aux-weight
grid form a set in the (main, aux) plane (both minimised; log10 where the task
says so). Its dominated hypervolume against one reference point, shared by all
methods of the task, is the score (larger is better): see
:func:`reference_point`. Mean and spread are over seeds.
"""

from typing import Any

import numpy as np

PANELS = {
  "train": ("main_train", "aux"),
  "test": ("main_test", "aux_test"),
}


def _axes(metrics: dict[str, np.ndarray], panel: str) -> tuple[str, str]:
  main, aux = PANELS[panel]
  return main, aux if aux in metrics else "aux"


def transform(values: np.ndarray, scale: str) -> np.ndarray:
  if scale == "log":
    with np.errstate(divide="ignore", invalid="ignore"):
      return np.log10(values)
  return np.asarray(values, np.float64)


def non_dominated(points: np.ndarray) -> np.ndarray:
  """Boolean mask of the points no other point dominates (minimising both)."""
  points = np.asarray(points, np.float64)
  keep = np.isfinite(points).all(axis=1)
  for i, p in enumerate(points):
    if not keep[i]:
      continue
    others = np.isfinite(points).all(axis=1)
    dominated = (points[others] <= p).all(axis=1) & (points[others] < p).any(axis=1)
    keep[i] = not dominated.any()
  return keep


def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
  """Area dominated by ``points`` and bounded by ``reference`` (2-D, minimise)."""
  points = np.asarray(points, np.float64)
  points = points[np.isfinite(points).all(axis=1)]
  points = points[(points < reference).all(axis=1)]
  if len(points) == 0:
    return 0.0
  points = points[non_dominated(points)]
  points = points[np.argsort(points[:, 0])]
  area, previous_y = 0.0, reference[1]
  for x, y in points:
    area += (reference[0] - x) * (previous_y - y)
    previous_y = y
  return float(area)


def end_points(metrics: dict[str, np.ndarray], panel: str, scales) -> np.ndarray:
  """[aux_weights, seeds, 2] transformed final (main, aux)."""
  main, aux = _axes(metrics, panel)
  return np.stack(
    [
      transform(metrics[main][..., -1], scales[0]),
      transform(metrics[aux][..., -1], scales[1]),
    ],
    axis=-1,
  )


def reference_point(results: dict[str, dict], panel: str, scales) -> np.ndarray:
  """One reference point per task and panel, shared by every method.

  Main axis: the untrained model's main loss (mean over runs), so a run that
  ends no better than where it started (e.g. Mixed collapsing to chance at a
  large aux weight) earns no area. Aux axis: the worst final or initial aux
  value over all runs plus 5% of the final range, so every end point counts.
  """
  initial_main, initial_aux, final_aux = [], [], []
  for metrics in results.values():
    main, aux = _axes(metrics, panel)
    initial_main.append(transform(metrics[main][..., 0], scales[0]).ravel())
    initial_aux.append(transform(metrics[aux][..., 0], scales[1]).ravel())
    final_aux.append(transform(metrics[aux][..., -1], scales[1]).ravel())
  finite = lambda parts: (lambda x: x[np.isfinite(x)])(np.concatenate(parts))
  final_aux, initial_aux = finite(final_aux), finite(initial_aux)
  spread = max(final_aux.max() - final_aux.min(), 1e-12)
  worst_aux = max(final_aux.max(), initial_aux.max())
  return np.array([np.nanmean(np.concatenate(initial_main)), worst_aux + 0.05 * spread])


def compare(results: dict[str, dict], scales) -> dict[str, Any]:
  """Hypervolume per method, panel and seed, with mean and std over seeds."""
  summary: dict[str, Any] = {"reference": {}, "methods": {}}
  for panel in PANELS:
    ref = reference_point(results, panel, scales)
    summary["reference"][panel] = ref.tolist()
    for name, metrics in results.items():
      pts = end_points(metrics, panel, scales)
      per_seed = [hypervolume(pts[:, s], ref) for s in range(pts.shape[1])]
      entry = summary["methods"].setdefault(name, {})
      entry[panel] = {
        "per_seed": per_seed,
        "mean": float(np.mean(per_seed)),
        "std": float(np.std(per_seed)),
        "diverged_runs": int((~np.isfinite(pts).all(axis=-1)).sum()),
      }
    summary.setdefault("attainment", {})[panel] = attainment(results, panel, scales)
  return summary


def _final_mean(metrics: dict[str, np.ndarray], key: str) -> np.ndarray:
  """Final values of ``key`` per aux weight, averaged over seeds, in float64."""
  return np.nanmean(np.asarray(metrics[key][..., -1], np.float64), axis=1)


def attainment(results: dict[str, dict], panel: str, scales, levels: int = 8) -> dict[str, Any]:
  """The lowest aux each method reaches with its main loss at most L.

  End points are averaged over seeds per aux weight. The levels L are spread
  (in the task's main scale) between the best and the worst final main loss
  that beat the untrained model. No interpolation: a level a method never
  reaches is None.
  """
  ends = {}
  for name, metrics in results.items():
    main, aux = _axes(metrics, panel)
    ends[name] = np.stack([_final_mean(metrics, main), _final_mean(metrics, aux)], axis=-1)
  finals = np.concatenate([e[:, 0] for e in ends.values()])
  reference = reference_point(results, panel, scales)[0]
  useful = finals[transform(finals, scales[0]) < reference]
  best, worst = np.nanmin(finals), np.nanmax(useful) if useful.size else np.nanmax(finals)
  grid = np.linspace(transform(best, scales[0]), transform(worst, scales[0]), levels)
  level_values = 10**grid if scales[0] == "log" else grid
  level_values[0], level_values[-1] = best, worst  # exactly, no log round trip
  table = {"levels": level_values.tolist(), "methods": {}}
  for name, e in ends.items():
    row = []
    for level in level_values:
      ok = e[:, 0] <= level
      row.append(float(np.nanmin(e[ok, 1])) if ok.any() else None)
    table["methods"][name] = row
  return table


def format_tables(task, results: dict[str, dict], summary: dict[str, Any]) -> str:
  """Final metrics per (method, aux weight), means over seeds, then the scores."""
  keys = [
    k
    for k in ("main_train", "main_test", "aux", "aux_test", "aux_2")
    if k in next(iter(results.values()))
  ]
  header = f"{'method':<22}{'aux_weight':>11}" + "".join(f"{k:>12}" for k in keys)
  lines = [f"== {task.name}: final values, mean over seeds", header, "-" * len(header)]
  for name, metrics in results.items():
    for i, lam in enumerate(task.aux_weights):
      row = "".join(f"{np.nanmean(metrics[k][i, :, -1]):>12.4g}" for k in keys)
      lines.append(f"{name:<22}{lam:>11.3g}{row}")
  lines += [
    "",
    f"== {task.name}: Pareto hypervolume (higher is better), mean +- std over seeds",
  ]
  header = f"{'method':<22}{'train front':>22}{'held-out front':>22}"
  lines += [header, "-" * len(header)]
  for name, entry in summary["methods"].items():
    cells = "".join(f"{entry[p]['mean']:>14.4f} +- {entry[p]['std']:<5.3f}" for p in PANELS)
    lines.append(f"{name:<22}{cells}")
  for panel in PANELS:
    table = summary["attainment"][panel]
    lines += [
      "",
      f"== {task.name}: lowest {panel} aux reached with {panel} main loss <= L"
      " (mean end points; * = best)",
    ]
    width = max(14, *(len(name) + 2 for name in table["methods"]))
    lines.append(f"{'L':>10}" + "".join(f"{name:>{width}}" for name in table["methods"]))
    for j, level in enumerate(table["levels"]):
      values = [row[j] for row in table["methods"].values()]
      best = min((v for v in values if v is not None), default=None)
      cells = "".join(
        f"{'-':>{width}}" if v is None else f"{v:>{width - 1}.4g}{'*' if v == best else ' '}"
        for v in values
      )
      lines.append(f"{level:>10.3g}{cells}")
  return "\n".join(lines)


def plot(task, results: dict[str, dict], path: str) -> None:
  """Two panels (train, held-out): faint trajectories, end points, fronts."""
  import matplotlib
  from matplotlib.figure import Figure  # no pyplot: leaves the global backend alone

  fig = Figure(figsize=(12, 4.8))
  axes = fig.subplots(1, 2)
  colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, panel in zip(axes, PANELS, strict=True):
    reference_main = reference_point(results, panel, task.scales)[0]
    all_main = np.concatenate(
      [transform(_final_mean(m, _axes(m, panel)[0]), task.scales[0]) for m in results.values()]
    )
    # Visual zoom only: end points within 10% (of the main-axis range) of the
    # untrained model's loss made no real progress and are left off-axis.
    threshold = reference_main - 0.1 * (reference_main - np.nanmin(all_main))
    useful_aux, hidden = [], 0
    for c, (name, metrics) in enumerate(results.items()):
      color = colors[c % len(colors)]
      main, aux = _axes(metrics, panel)
      for i in range(len(task.aux_weights)):
        ax.plot(metrics[aux][i, 0], metrics[main][i, 0], color=color, alpha=0.15, lw=0.8)
      ends = np.stack([_final_mean(metrics, aux), _final_mean(metrics, main)], axis=-1)
      ax.scatter(ends[:, 0], ends[:, 1], color=color, s=22, zorder=3, label=name)
      scaled = np.stack(
        [transform(ends[:, 1], task.scales[0]), transform(ends[:, 0], task.scales[1])], axis=-1
      )
      front = ends[non_dominated(scaled)]
      front = front[np.argsort(front[:, 0])]
      ax.plot(front[:, 0], front[:, 1], color=color, lw=1.8, zorder=2)
      useful = scaled[:, 0] < threshold
      useful_aux.append(ends[useful, 0])
      hidden += int((~useful).sum())
    ax.set_yscale(task.scales[0])
    ax.set_xscale(task.scales[1])
    useful_aux = np.concatenate(useful_aux)
    if hidden and useful_aux.size:
      # Zoom on the end points that beat the untrained model; say what is left out.
      lo, hi = (
        transform(useful_aux.min(), task.scales[1]),
        transform(useful_aux.max(), task.scales[1]),
      )
      pad = 0.08 * max(hi - lo, 1e-6)
      back = (lambda v: 10**v) if task.scales[1] == "log" else (lambda v: v)
      ax.set_xlim(back(lo - pad), back(hi + pad))
      ax.text(
        0.02,
        0.02,
        f"{hidden} end point(s) within 10% of the untrained loss: off-axis",
        transform=ax.transAxes,
        fontsize=7,
        color="0.3",
      )
    where = "train" if panel == "train" else "held-out"
    aux_where = (
      where
      if _axes(next(iter(results.values())), panel)[1] != "aux" or panel == "train"
      else "train"
    )
    ax.set_ylabel(f"{task.labels[0]} ({where})")
    ax.set_xlabel(f"{task.labels[1]} ({aux_where})")
    ax.set_title(f"{task.name}: {where} (end points: mean over seeds)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
