"""The experiment runner: Pareto maths exactly, every task end to end (quick)."""

import json

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


def test_attainment_is_the_best_aux_below_each_level():
  results = {"a": _fake([[0.1, 3.0], [1.0, 1.0]]), "b": _fake([[0.5, 2.0]])}
  table = pareto.attainment(results, "train", ("linear", "linear"), levels=3)
  # Levels span the final main losses that beat the untrained model (2.0).
  np.testing.assert_allclose(table["levels"], [0.1, 0.55, 1.0])
  assert table["methods"]["a"] == [3.0, 3.0, 1.0]
  assert table["methods"]["b"] == [None, 2.0, 2.0]


@pytest.mark.parametrize("task", [t for t in experiments.ALL_TASKS if t != "quadratics_cyclic"])
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
  assert "Pareto hypervolume" in printed and "lowest train aux" in printed
  for method, metrics in result["metrics"].items():
    for name, values in metrics.items():
      values = np.asarray(values)
      assert values.shape == (len(result["aux_weights"]), 2, result["epochs"] + 1), (
        method,
        name,
      )
      assert np.isfinite(values).all(), (method, name)
    assert result["hypervolume"]["methods"][method]["train"]["mean"] >= 0.0
  assert "mixed" in result["metrics"] and any("bloop" in m for m in result["metrics"])
