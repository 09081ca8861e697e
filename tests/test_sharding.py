"""Bloop over 8 forced CPU devices: same result, same sharding, scalar traffic."""

import json
import pathlib
import re
import subprocess
import sys

import pytest

WORKER = pathlib.Path(__file__).with_name("sharding_worker.py")


# The explicit mesh (sharding in the types, the stricter partitioner) runs in
# the README's test command for every transform that is not an aggregator and a
# few aggregators (catalogue.QUICK_ON_DEVICES); the slow tier runs every
# aggregator on the explicit mesh and everything with automatic sharding (each
# a subprocess of minutes on 8 forced devices).
@pytest.fixture(
  scope="module",
  params=[
    ("Explicit", "quick"),
    pytest.param(("Explicit", "full"), marks=pytest.mark.slow),
    pytest.param(("Auto", "full"), marks=pytest.mark.slow),
  ],
  ids=lambda p: "-".join(p),
)
def report(request):
  done = subprocess.run(
    [sys.executable, str(WORKER), *request.param],
    capture_output=True,
    text=True,
    check=False,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_sharded_update_equals_single_device(report):
  assert report["devices"] == 8
  assert report["params_max_diff"] < 1e-5
  assert report["ema_max_diff"] < 1e-6


def test_ema_and_direction_keep_the_params_sharding(report):
  assert all(report["ema_keeps_sharding"].values())
  assert all(report["direction_keeps_sharding"].values())
  assert report["w_is_split"]


def test_compiled_update_communicates_only_scalars(report):
  ops = report["collectives"]
  assert ops, "the global inner product must all-reduce across devices"
  for op, shape in ops:
    assert op == "all-reduce", f"unexpected {op} of {shape}"
    arrays = re.findall(r"\w+\[[^\]]*\]", shape)
    assert arrays and all(a.endswith("[]") for a in arrays), shape


def test_aggregators_sharded_equal_single_device_and_communicate_only_scalars(report):
  """Every aggregator of the catalogue (with its EMA where it has one), and
  hierarchical_bloop (the same tuple of three gradients), on 8 devices: the same
  result, the params' sharding, and only scalar all-reduces (the Gram matrix)."""
  from tests import catalogue

  coverage = report["coverage"]
  cases = catalogue.one_per_aggregator()
  expected = {c.name for c in cases if catalogue.covered_on_devices(c.name, coverage)}
  assert set(report["aggregators"]) == expected | {"hierarchical_bloop", "upgrad_ema_k12"}
  for name, rep in report["aggregators"].items():
    if name == "upgrad_ema_k12":
      continue
    assert rep["params_max_diff"] < 1e-5, name
    assert rep["direction_keeps_sharding"], name
    # Every rule reads the gradients across devices (its Gram matrix, or for fixed
    # and random weights their finiteness) but the mean, which reads nothing.
    assert bool(rep["collectives"]) == (name != "aggregators.mean"), name
    for op, shape in rep["collectives"]:
      assert op == "all-reduce", (name, op, shape)
      arrays = re.findall(r"\w+\[[^\]]*\]", shape)
      assert arrays and all(a.endswith("[]") for a in arrays), (name, shape)


def test_every_transform_keeps_its_state_types_on_an_explicit_mesh(report):
  """optax's sharding contract: jax.typeof of every state leaf (with its
  sharding) is the same after a step as after init, for every exported
  transform (tests/catalogue.py)."""
  if not report["state_types"]:
    pytest.skip("checked on the Explicit mesh")
  from tests.catalogue import IDS
  from tests.catalogue import covered_on_devices

  assert set(report["state_types"]) == {i for i in IDS if covered_on_devices(i, report["coverage"])}
  assert all(report["state_types"].values()), report["state_types"]


def test_many_objectives_sharded_communicate_only_the_gram_matrix(report):
  """K = 12 (the stacked Gram product): the same result as one device, and the
  only collectives are all-reduces of scalars or of the 12 x 12 Gram matrix."""
  rep = report["aggregators"]["upgrad_ema_k12"]
  assert rep["params_max_diff"] < 1e-5
  assert rep["direction_keeps_sharding"]
  assert rep["collectives"]
  for op, shape in rep["collectives"]:
    assert op == "all-reduce", (op, shape)
    arrays = re.findall(r"\w+\[[^\]]*\]", shape)
    assert arrays and all(a.endswith(("[]", "[12,12]")) for a in arrays), shape
