"""The experiment runner: Pareto maths exactly, every task end to end (quick)."""

import json
import subprocess

import numpy as np
import pytest

from benchmarks import experiments
from benchmarks import pareto

pytestmark = pytest.mark.optax_optimizer


def test_hypervolume_of_a_staircase():
  points = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
  # Three rectangles against (4, 4): 3*1 + 2*1 + 1*1.
  assert pareto.hypervolume(points, np.array([4.0, 4.0])) == pytest.approx(6.0)
  # A dominated point, a NaN and a point beyond the reference change nothing.
  more = np.vstack([points, [[2.5, 2.5], [np.nan, 0.0], [5.0, 0.0]]])
  assert pareto.hypervolume(more, np.array([4.0, 4.0])) == pytest.approx(6.0)
  assert pareto.hypervolume(np.zeros((0, 2)), np.array([1.0, 1.0])) == 0.0


def test_non_dominated():
  points = np.array([[1.0, 3.0], [2.0, 2.0], [2.0, 3.0], [3.0, 1.0], [np.nan, 0.0]])
  np.testing.assert_array_equal(pareto.non_dominated(points), [True, True, False, True, False])


def _fake(ends, start=(2.0, 5.0)):
  """Metrics with one seed: epoch 0 at ``start``, final at each end point."""
  ends = np.asarray(ends, np.float64)
  main = np.stack([np.full(len(ends), start[0]), ends[:, 0]], axis=-1)[:, None, :]
  aux = np.stack([np.full(len(ends), start[1]), ends[:, 1]], axis=-1)[:, None, :]
  return {"main_train": main, "main_test": main, "aux": aux}


def test_reference_point_gives_no_credit_for_ending_where_you_started():
  results = {"a": _fake([[1.0, 1.0]]), "collapsed": _fake([[2.0, -10.0]])}
  summary = pareto.compare(results, ("linear", "linear"))
  assert summary["reference"]["train"][0] == pytest.approx(2.0)
  assert summary["methods"]["collapsed"]["train"]["mean"] == 0.0
  assert summary["methods"]["a"]["train"]["mean"] > 0.0


def test_a_run_that_ends_at_chance_earns_exactly_zero_area():
  """Chance (1.5) sits below the untrained loss (2.0): a collapsed run ending at
  chance with a tiny aux, or between chance and the untrained loss, earns
  nothing, and the reference moves down to chance."""
  chance = {"train": 1.5, "test": 1.5}
  useful = [[0.5, 2.0], [1.0, 1.0]]
  alone = pareto.compare({"m": _fake(useful)}, ("linear", "linear"), chance)
  with_collapse = pareto.compare(
    {"m": _fake([*useful, [1.5, -50.0], [1.8, -60.0]])}, ("linear", "linear"), chance
  )
  assert with_collapse["reference"]["train"][0] == pytest.approx(1.5)
  # Same reference aux for both: the area is the useful runs' area alone.
  ref = np.array(with_collapse["reference"]["train"])
  assert pareto.hypervolume(np.array(useful), ref) == pytest.approx(
    with_collapse["methods"]["m"]["train"]["mean"]
  )
  assert pareto.hypervolume(np.array([[1.5, -50.0], [1.8, -60.0]]), ref) == 0.0
  assert with_collapse["methods"]["m"]["train"]["collapsed_runs"] == 2
  assert alone["methods"]["m"]["train"]["collapsed_runs"] == 0


def _fake_seeds(per_seed_ends, start=(2.0, 5.0)):
  """Metrics with one seed per entry of ``per_seed_ends`` ([weights, 2] each)."""
  ends = np.asarray(per_seed_ends, np.float64)  # [seeds, weights, 2]
  seeds, weights = ends.shape[:2]
  main = np.empty((weights, seeds, 2))
  aux = np.empty((weights, seeds, 2))
  main[..., 0], aux[..., 0] = start
  main[..., 1], aux[..., 1] = ends[..., 0].T, ends[..., 1].T
  return {"main_train": main, "main_test": main, "aux": aux}


def test_matched_loss_equals_a_hand_computation():
  # Method a, two seeds; method b, two seeds. Linear scales, chance 1.9.
  a = _fake_seeds([[[0.2, 4.0], [0.6, 2.0], [1.0, 1.0]], [[0.2, 3.0], [1.0, 1.0], [1.9, 0.0]]])
  b = _fake_seeds([[[0.4, 3.0], [0.8, 2.0], [1.2, 0.5]], [[0.3, 3.5], [0.9, 1.5], [0.9, 3.0]]])
  table = pareto.matched_loss(
    {"bloop": a, "b": b}, "train", ("linear", "linear"), {"train": 1.9}, levels=3
  )
  # Fronts: a0 (0.2,4)-(0.6,2)-(1,1); a1 (0.2,3)-(1,1), (1.9, 0) at chance dropped;
  # b0 (0.4,3)-(0.8,2)-(1.2,.5); b1 (0.3,3.5)-(0.9,1.5), (0.9,3) dominated.
  # Common range: from max best main 0.4 to min last main 0.9.
  np.testing.assert_allclose(table["levels"], [0.4, 0.65, 0.9])
  # a at 0.4: seed 0 on (0.2,4)-(0.6,2) -> 3.0; seed 1 on (0.2,3)-(1,1) -> 2.5.
  # a at 0.65: 2 - 0.125 = 1.875 and 3 - 2 * 0.5625 = 1.875; at 0.9: 1.25 and 1.25.
  # b at 0.4: 3.0 and 3.5 - 2 / 6; at 0.65: 2.375 and 3.5 - 0.7 / 0.6; at 0.9: 1.625 and 1.5.
  a_means = [2.75, 1.875, 1.25]
  b_means = [(3.0 + 3.5 - 2 / 6) / 2, (2.375 + 3.5 - 0.7 / 0.6) / 2, (1.625 + 1.5) / 2]
  np.testing.assert_allclose([c["mean"] for c in table["methods"]["bloop"]], a_means)
  np.testing.assert_allclose([c["mean"] for c in table["methods"]["b"]], b_means)
  # 95% Student-t interval with 2 seeds: t(0.975, 1) = 12.706, sd/sqrt(2) = |x0 - x1| / 2.
  half = 12.706204736 * abs(3.0 - 2.5) / 2
  assert table["methods"]["bloop"][0]["low"] == pytest.approx(2.75 - half)
  assert table["methods"]["bloop"][1]["low"] == pytest.approx(1.875)  # both seeds equal
  # At 0.65 a's seeds agree (1.875, zero width) and b's interval, 2.354 +- 0.265,
  # lies above it: a win. At 0.4 a's interval is wide, at 0.9 b's (1.5625 +- 0.79).
  assert table["verdicts"]["b"] == ["tie", "win", "tie"]


def test_matched_loss_verdicts_need_separated_intervals():
  a = _fake_seeds([[[0.2, 1.0], [1.0, 0.5]]] * 3)  # identical seeds: zero width
  b = _fake_seeds([[[0.2, 2.0], [1.0, 1.0]], [[0.2, 2.1], [1.0, 1.1]], [[0.2, 1.9], [1.0, 0.9]]])
  table = pareto.matched_loss({"bloop": a, "b": b}, "train", ("linear", "linear"), levels=2)
  assert table["verdicts"]["b"] == ["win", "win"]
  table = pareto.matched_loss({"bloop": b, "b": a}, "train", ("linear", "linear"), levels=2)
  assert table["verdicts"]["b"] == ["loss", "loss"]


def test_matched_loss_never_extrapolates():
  a = _fake_seeds([[[0.2, 1.0], [0.4, 0.5]]])
  b = _fake_seeds([[[0.6, 1.0], [0.9, 0.5]]])  # no overlap in main loss with a
  table = pareto.matched_loss({"bloop": a, "b": b}, "train", ("linear", "linear"))
  assert table["levels"] == [] and "overlap" in table["note"]


def test_a_method_on_its_own_grid_is_compared_with_bloop_apart():
  a = _fake_seeds([[[0.2, 1.0], [0.6, 0.5]]] * 2)
  b = _fake_seeds([[[0.3, 1.2], [0.7, 0.6]]] * 2)
  apart = _fake_seeds([[[0.05, 0.9], [0.1, 0.01]]] * 2)  # below everyone's main loss
  overlapping = _fake_seeds([[[0.25, 1.0], [0.5, 0.2]]] * 2)
  scales = ("linear", "linear")
  alone = pareto.compare({"bloop": a, "b": b}, scales)
  for pcd in (apart, overlapping):
    summary = pareto.compare({"bloop": a, "b": b, "pcd": pcd}, scales, own_grid=("pcd",))
    # the other methods' table, reference point and areas are those without pcd
    assert summary["matched_loss"] == alone["matched_loss"]
    assert summary["reference"] == alone["reference"]
    assert summary["methods"]["b"] == alone["methods"]["b"]
    assert summary["methods"]["pcd"]["train"]["mean"] > 0
  assert summary["versus"]["train"]["pcd"]["levels"] != []
  pair = summary["versus"]["train"]["pcd"]
  # pcd against bloop alone, over the range the two share (0.25 .. 0.5): at 0.25 bloop's
  # front gives 1 - 0.5 * 0.05 / 0.4 = 0.9375 < pcd's 1.0, at 0.5 0.625 > pcd's 0.2
  np.testing.assert_allclose([pair["levels"][0], pair["levels"][-1]], [0.25, 0.5])
  np.testing.assert_allclose([pair["methods"]["bloop"][0]["mean"]], [0.9375])
  assert pair["verdicts"]["pcd"][0] == "win" and pair["verdicts"]["pcd"][-1] == "loss"
  summary = pareto.compare({"bloop": a, "b": b, "pcd": apart}, scales, own_grid=("pcd",))
  assert summary["versus"]["train"]["pcd"]["levels"] == []


def test_default_output_folder_is_ignored_by_git():
  root = experiments.ROOT
  if not (root / ".git").exists():
    pytest.skip("not a git checkout")
  probe = experiments.DEFAULT_OUT / "digits_smooth_mlp.json"
  done = subprocess.run(
    ["git", "check-ignore", "-q", str(probe)], cwd=root, check=False, capture_output=True
  )
  assert done.returncode == 0, f"{probe} would show in git status"


# The tasks that compile their own models (a transformer, the multitask net, extra
# EMA variants) or train for a minute (digits, the README's main job) run in the
# slow tier (pytest -m slow).
SLOW_TASKS = {"text", "multitask", "ema_ablation", "three_objectives", "digits"}


@pytest.mark.parametrize(
  "task",
  [
    pytest.param(t, marks=[pytest.mark.slow] if t in SLOW_TASKS else [])
    for t in experiments.ALL_TASKS
    if t != "quadratics_cyclic"
  ],
)
def test_every_task_runs_and_writes_its_outputs(task, tmp_path, capsys):
  assert experiments.main(["--task", task, "--quick", "--seeds", "2", "--out", str(tmp_path)]) == 0
  printed = capsys.readouterr().out
  stem = {
    "quadratics": "quadratics",
    "digits": "digits_smooth_mlp",
    "multitask": "digits_multitask",
    "ema_ablation": "digits_ema_ablation",
    "text": "text_joint",
    "three_objectives": "digits_three_objectives",
    "monte_carlo": "monte_carlo",
  }[task]
  assert (tmp_path / f"{stem}.png").stat().st_size > 10_000
  result = json.loads((tmp_path / f"{stem}.json").read_text())
  if task == "monte_carlo":
    curves = result["curves"]["no EMA (ema_decay=0)"]
    scale = result["distance_bloop_mixed"]
    # Small noise: the projection is Bloop's; huge noise: it is Mixed's.
    assert curves["to_bloop"][0] < 0.05 * scale < curves["to_mixed"][0]
    assert curves["to_mixed"][-1] < 0.1 * scale < curves["to_bloop"][-1]
    assert "monte_carlo (Figure 2)" in printed
    return
  assert "Pareto hypervolume" in printed and "mean [95% interval]" in printed
  assert result["protocol"]["seeds"] == 2 and result["protocol"]["optimisation_steps"] > 0
  for method, metrics in result["metrics"].items():
    for name, values in metrics.items():
      values = np.asarray(values)
      evaluations = result["epochs"] // result["eval_every"]
      grid = result["grids"].get(method, result["aux_weights"])  # PCD sweeps its own tau
      assert values.shape == (len(grid), 2, evaluations + 1), (method, name)
      assert np.isfinite(values).all(), (method, name)
    assert result["scores"]["methods"][method]["train"]["mean"] >= 0.0
  assert "mixed" in result["metrics"] and any("bloop" in m for m in result["metrics"])
  assert "pcd" in result["metrics"] and all(0 <= t <= 1 for t in result["grids"]["pcd"])
  if task == "quadratics":
    _check_reuse(tmp_path, result)


def _check_reuse(full, result):
  """--methods with --reuse trains the named methods and takes the others' metrics,
  unchanged, from an earlier run of the same protocol (``full``, 2 seeds)."""
  args = ["--task", "quadratics", "--quick", "--methods", "pcd", "--reuse", str(full)]
  assert experiments.main([*args, "--seeds", "2", "--out", str(full / "part")]) == 0
  part = json.loads((full / "part" / "quadratics.json").read_text())
  assert list(part["metrics"]) == list(result["metrics"])
  assert part["metrics"] == result["metrics"]  # pcd retrained to the same numbers, the rest kept
  # the time of every method: the kept ones' as recorded, pcd's from this run
  kept, was = part["seconds_by_method"], result["seconds_by_method"]
  assert list(kept) == list(was) and all(kept[m] == was[m] for m in was if m != "pcd")
  assert part["seconds"] == pytest.approx(sum(kept.values()))
  with pytest.raises(SystemExit, match="another protocol"):
    experiments.main([*args, "--seeds", "3", "--out", str(full / "x")])
