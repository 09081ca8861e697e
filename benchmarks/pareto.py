"""Pareto fronts of (main, aux) end points: matched-loss comparisons,
hypervolumes, tables and plots.

For every method and seed, the end points over the aux-weight grid form a set
in the (main, aux) plane (both minimised; log10 where the task says so).

* The headline, :func:`matched_loss`: at main-loss levels inside the range
  that every method and seed reaches, the lowest aux each method attains with
  its main loss at or below the level (interpolated along its front, never
  extrapolated), as a mean and a 95% interval over seeds. A method wins a
  level only where the intervals do not overlap.
* A secondary score, :func:`hypervolume`: the area a front dominates, bounded
  by a reference point whose main coordinate is at or below chance (the best
  constant prediction) and the untrained model's loss, so a run that ends
  there, e.g. collapsed, earns exactly nothing.
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


def reference_point(results: dict[str, dict], panel: str, scales, chance=None) -> np.ndarray:
  """One reference point per task and panel, shared by every method.

  Main axis: the lower of the untrained model's main loss (mean over runs) and
  ``chance[panel]`` (the best constant prediction's loss, where the task has
  one), so a run that ends no better than either (e.g. Mixed collapsing to
  chance at a large aux weight) earns no area. Aux axis: the worst final or
  initial aux value over all runs plus 5% of the final range, so every useful
  end point counts.
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
  main_ref = np.nanmean(np.concatenate(initial_main))
  if chance is not None and panel in chance:
    main_ref = min(main_ref, float(transform(np.asarray(chance[panel]), scales[0])))
  return np.array([main_ref, worst_aux + 0.05 * spread])


# ---------------------------------------------------------------- matched loss


def front_curve(points: np.ndarray, reference_main: float) -> np.ndarray:
  """The Pareto front of ``points`` ([n, 2], transformed) as a sorted polyline.

  Non-finite points and points at or above ``reference_main`` (no better than
  chance or the untrained model) are dropped. Rows are sorted by main loss,
  so the aux values decrease along the rows.
  """
  points = np.asarray(points, np.float64)
  points = points[np.isfinite(points).all(axis=1) & (points[:, 0] < reference_main)]
  if len(points) == 0:
    return points.reshape(0, 2)
  front = points[non_dominated(points)]
  return front[np.argsort(front[:, 0])]


def aux_at(front: np.ndarray, level: float) -> float:
  """Lowest aux with main <= ``level`` along a front, linearly interpolated
  between its points (transformed units); NaN below the front's best main."""
  if len(front) == 0 or level < front[0, 0]:
    return float("nan")
  if level >= front[-1, 0]:
    return float(front[-1, 1])
  k = int(np.searchsorted(front[:, 0], level, side="right")) - 1
  (x0, y0), (x1, y1) = front[k], front[k + 1]
  return float(y0 + (y1 - y0) * (level - x0) / (x1 - x0))


def _interval(values: np.ndarray) -> tuple[float, float, float]:
  """Mean and the 95% Student-t interval over seeds."""
  from scipy import stats

  values = np.asarray(values, np.float64)
  mean = float(values.mean())
  if len(values) < 2:
    return mean, mean, mean
  half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
  return mean, mean - half, mean + half


def matched_loss(
  results: dict[str, dict],
  panel: str,
  scales,
  chance=None,
  levels: int = 6,
  ours: str | None = "bloop",
) -> dict[str, Any]:
  """Lowest aux per method at matched main-loss levels, with 95% intervals.

  Each seed's front is the non-dominated set of its end points over the aux
  weights. The levels are spread evenly (in the task's main scale) over the
  range that every (method, seed) front covers: from the largest of their
  best main losses to the smallest of their main losses at their lowest aux.
  Outside that range one method would be compared with nothing, so no level
  goes there. Values are in the task's aux units.

  Returns:
    ``{"levels": [...], "methods": {name: [{"mean", "low", "high"} or None]},
    "verdicts": {name: ["win" | "tie" | "loss" per level]}}`` where a verdict
    compares ``ours`` (if present) with that method: "win" where the
    interval of ``ours`` lies entirely below.
  """
  reference = reference_point(results, panel, scales, chance)[0]
  fronts = {
    name: [
      front_curve(end_points(metrics, panel, scales)[:, s], reference)
      for s in range(next(iter(metrics.values())).shape[1])
    ]
    for name, metrics in results.items()
  }
  all_fronts = [f for per_seed in fronts.values() for f in per_seed]
  if any(len(f) == 0 for f in all_fronts):
    return {"levels": [], "methods": {}, "verdicts": {}, "note": "a front is empty"}
  low = max(f[0, 0] for f in all_fronts)
  high = min(f[-1, 0] for f in all_fronts)
  if not low < high:
    return {"levels": [], "methods": {}, "verdicts": {}, "note": "the fronts do not overlap"}
  grid = np.linspace(low, high, levels)
  back_main = (lambda v: 10**v) if scales[0] == "log" else (lambda v: v)
  back_aux = (lambda v: 10**v) if scales[1] == "log" else (lambda v: v)
  table: dict[str, Any] = {"levels": [float(back_main(g)) for g in grid], "methods": {}}
  for name, per_seed in fronts.items():
    row = []
    for g in grid:
      values = np.array([aux_at(f, g) for f in per_seed])
      mean, lo, hi = _interval(values)  # in transformed units, then back
      row.append({"mean": back_aux(mean), "low": back_aux(lo), "high": back_aux(hi)})
    table["methods"][name] = row
  verdicts = {}
  if ours in table["methods"]:
    for name, row in table["methods"].items():
      if name == ours:
        continue
      verdicts[name] = [
        "win" if a["high"] < b["low"] else "loss" if b["high"] < a["low"] else "tie"
        for a, b in zip(table["methods"][ours], row, strict=True)
      ]
  table["verdicts"] = verdicts
  table["ours"] = ours
  return table


# The method the own-grid methods are compared with, the first of these present.
OURS = ("bloop", "bloop(ema_decay=0.99)", "hierarchical_bloop")


def compare(
  results: dict[str, dict], scales, chance=None, own_grid: tuple[str, ...] = ()
) -> dict[str, Any]:
  """Matched-loss tables, and hypervolume per method, panel and seed.

  ``own_grid`` names the methods that sweep their own knob (PCD's tau) rather
  than the aux weight. The headline table and the hypervolumes' reference
  point come from the other methods alone, so adding such a method changes
  none of their numbers (its fronts can span another main-loss range: PCD
  never trades main loss away as Mixed does at a large weight). Each gets a
  table of its own against Bloop (``"versus"``), over the range the two share.
  """
  rest = {k: v for k, v in results.items() if k not in own_grid} or results
  ours = next((name for name in OURS if name in rest), None)
  summary: dict[str, Any] = {"reference": {}, "methods": {}, "matched_loss": {}}
  for panel in PANELS:
    ref = reference_point(rest, panel, scales, chance)
    summary["matched_loss"][panel] = matched_loss(rest, panel, scales, chance, ours=ours)
    for name in own_grid if ours is not None else ():
      pair = {ours: results[ours], name: results[name]}
      summary.setdefault("versus", {}).setdefault(panel, {})[name] = matched_loss(
        pair, panel, scales, chance, ours=ours
      )
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
        "collapsed_runs": int((pts[..., 0] >= ref[0]).sum()),
      }
  return summary


def _quiet_nanmean(values: np.ndarray, axis=None) -> np.ndarray:
  """``np.nanmean`` (NaN where every run diverged) without numpy's warning for
  an all-NaN slice."""
  values = np.asarray(values, np.float64)
  known = ~np.isnan(values)
  count = known.sum(axis=axis)
  total = np.where(known, values, 0.0).sum(axis=axis)
  return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _final_mean(metrics: dict[str, np.ndarray], key: str) -> np.ndarray:
  """Final values of ``key`` per aux weight, averaged over seeds, in float64."""
  return _quiet_nanmean(metrics[key][..., -1], axis=1)


def format_matched(task_name: str, table: dict[str, Any], panel: str) -> str:
  """The matched-loss table as text: mean [95% interval] per method and level."""
  where = "train" if panel == "train" else "held-out"
  lines = [
    f"== {task_name}: lowest aux with {where} main loss <= L, mean [95% interval] over seeds",
  ]
  if not table["levels"]:
    return "\n".join([*lines, f"   (no common range: {table.get('note', '')})"])
  names = list(table["methods"])
  width = max(26, *(len(n) + 2 for n in names))
  header = f"{'L':>10}" + "".join(f"{n:>{width}}" for n in names)
  if table["verdicts"]:
    header += f"   {table['ours']} vs " + ", ".join(table["verdicts"])
  lines += [header, "-" * len(header)]
  for j, level in enumerate(table["levels"]):
    cells = "".join(
      f"{c['mean']:>{width - 17}.4g} [{c['low']:.3g}, {c['high']:.3g}]".rjust(width)
      for c in (table["methods"][n][j] for n in names)
    )
    verdict = ", ".join(v[j] for v in table["verdicts"].values())
    lines.append(f"{level:>10.4g}{cells}   {verdict}")
  return "\n".join(lines)


def format_tables(task, results: dict[str, dict], summary: dict[str, Any]) -> str:
  """Final metrics per (method, aux weight), means over seeds, then the scores."""
  keys = [
    k
    for k in ("main_train", "main_test", "aux", "aux_test", "aux_2")
    if k in next(iter(results.values()))
  ]
  header = f"{'method':<26}{'weight/tau':>11}" + "".join(f"{k:>12}" for k in keys)
  lines = [f"== {task.name}: final values, mean over seeds", header, "-" * len(header)]
  for name, metrics in results.items():
    for i, lam in enumerate(task.grid(name)):
      row = "".join(f"{float(_quiet_nanmean(metrics[k][i, :, -1])):>12.4g}" for k in keys)
      lines.append(f"{name:<26}{lam:>11.3g}{row}")
  for panel in PANELS:
    lines += ["", format_matched(task.name, summary["matched_loss"][panel], panel)]
  for panel, tables in summary.get("versus", {}).items():
    for name, table in tables.items():
      lines += ["", format_matched(f"{task.name}, {name} against Bloop", table, panel)]
  lines += [
    "",
    f"== {task.name}: Pareto hypervolume (secondary; higher is better), mean +- std over seeds",
  ]
  header = f"{'method':<26}{'train front':>22}{'held-out front':>22}{'collapsed runs':>16}"
  lines += [header, "-" * len(header)]
  for name, entry in summary["methods"].items():
    cells = "".join(f"{entry[p]['mean']:>14.4f} +- {entry[p]['std']:<5.3f}" for p in PANELS)
    lines.append(f"{name:<26}{cells}{entry['train']['collapsed_runs']:>16}")
  return "\n".join(lines)


def _front_panel(ax, task, results, panel, chance, colors) -> None:
  """End points (mean over seeds), faint trajectories and fronts of one panel.

  Runs that end at or above the reference (chance or the untrained loss) are
  drawn on the top edge with an x; runs that diverged, at the top-right corner
  with a triangle: never silently off the axes.
  """
  reference = reference_point(results, panel, task.scales, chance)[0]
  back = (lambda v: 10**v) if task.scales[0] == "log" else (lambda v: v)
  top = back(reference)
  collapsed = diverged = 0
  aux_values = []
  for c, (name, metrics) in enumerate(results.items()):
    color = colors[c % len(colors)]
    main, aux = _axes(metrics, panel)
    ends = np.stack([_final_mean(metrics, aux), _final_mean(metrics, main)], axis=-1)
    for i in range(metrics[aux].shape[0]):
      ax.plot(metrics[aux][i, 0], np.minimum(metrics[main][i, 0], top), color=color, alpha=0.12)
    ok = np.isfinite(ends).all(axis=1)
    low = ok & (transform(ends[:, 1], task.scales[0]) < reference)
    aux_values.append(ends[ok, 0])
    ax.scatter(ends[low, 0], ends[low, 1], color=color, s=22, zorder=3, label=name)
    high = ok & ~low
    if high.any():
      ax.scatter(ends[high, 0], np.full(high.sum(), top), color=color, marker="x", s=40, zorder=4)
    collapsed += int(high.sum())
    diverged += int((~ok).sum())
    scaled = np.stack(
      [transform(ends[:, 1], task.scales[0]), transform(ends[:, 0], task.scales[1])], -1
    )
    front = front_curve(scaled, reference)
    if len(front):
      back_aux = (lambda v: 10**v) if task.scales[1] == "log" else (lambda v: v)
      ax.plot(back_aux(front[:, 1]), back(front[:, 0]), color=color, lw=1.8, zorder=2)
  aux_values = np.concatenate(aux_values)
  if diverged:
    ax.scatter([np.nanmax(aux_values)], [top], marker="^", color="k", s=40, zorder=4)
  ax.set_yscale(task.scales[0])
  ax.set_xscale(task.scales[1])
  lo, hi = ax.get_ylim()
  ax.set_ylim(
    lo,
    top * (1.08 if task.scales[0] == "log" else 1)
    + (0 if task.scales[0] == "log" else 0.03 * (top - lo)),
  )
  notes = []
  if collapsed:
    notes.append(f"x on the top edge: {collapsed} end point(s) at or above chance/untrained")
  if diverged:
    notes.append(f"triangle: {diverged} diverged run(s)")
  if notes:
    ax.text(0.02, 0.02, "; ".join(notes), transform=ax.transAxes, fontsize=7, color="0.3")
  where = "train" if panel == "train" else "held-out"
  has_aux_panel = _axes(next(iter(results.values())), panel)[1] != "aux"
  aux_where = f" ({where})" if has_aux_panel or task.labels[1].endswith("CE") else ""
  ax.set_ylabel(f"{task.labels[0]} ({where})")
  ax.set_xlabel(f"{task.labels[1]}{aux_where}")
  ax.set_title(f"{where}: end points (mean over seeds) and fronts", fontsize=10)
  ax.grid(alpha=0.3, which="both")


def _matched_panel(ax, task, summary, colors) -> None:
  """Lowest aux at matched main loss, mean and 95% interval, train and held-out."""
  for panel, style in (("train", "-"), ("test", "--")):
    table = summary["matched_loss"][panel]
    for c, (name, row) in enumerate(table["methods"].items()):
      mean = np.array([r["mean"] for r in row])
      err = np.array([[r["mean"] - r["low"] for r in row], [r["high"] - r["mean"] for r in row]])
      where = "train" if panel == "train" else "held-out"
      ax.errorbar(
        table["levels"],
        mean,
        yerr=err,
        color=colors[c % len(colors)],
        ls=style,
        marker="o",
        ms=3,
        capsize=2,
        label=f"{name} ({where})",
      )
  if not any(summary["matched_loss"][p]["levels"] for p in ("train", "test")):
    ax.text(0.5, 0.5, "the fronts share no main-loss range", ha="center", transform=ax.transAxes)
    return
  ax.set_xscale(task.scales[0])
  ax.set_yscale(task.scales[1])
  ax.set_xlabel(f"matched level L of {task.labels[0]}")
  ax.set_ylabel(f"lowest {task.labels[1]} with main <= L")
  ax.set_title("matched main loss (solid: train, dashed: held-out)", fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)


def plot(task, results: dict[str, dict], summary: dict[str, Any], path: str) -> None:
  """Train and held-out fronts, and the matched-loss comparison."""
  import matplotlib
  from matplotlib.figure import Figure  # no pyplot: leaves the global backend alone

  fig = Figure(figsize=(17, 5))
  axes = fig.subplots(1, 3)
  colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
  for ax, panel in zip(axes[:2], PANELS, strict=True):
    _front_panel(ax, task, results, panel, task.chance, colors)
  axes[0].legend(fontsize=8)
  _matched_panel(axes[2], task, summary, colors)
  fig.suptitle(f"{task.name}", fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
