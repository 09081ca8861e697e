"""Two real JAX processes (jax.distributed on 127.0.0.1, gloo CPU collectives,
4 devices each) on one 8-device mesh equal one device, communicate only scalars
across both processes, and resume from a checkpoint both of them saved."""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import pytest

# Two processes that compile for a minute and a half: the slow tier.
pytestmark = pytest.mark.slow

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  folder = tmp_path_factory.mktemp("checkpoints")
  port = str(free_port())
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [
    subprocess.Popen(
      [sys.executable, str(WORKER), str(i), port, str(folder)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
    )
    for i in range(2)
  ]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=240))
  finally:
    for proc in procs:  # only the processes this test started
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  for proc, (_, err) in zip(procs, outputs, strict=True):
    assert proc.returncode == 0, err[-3000:]
  return json.loads(outputs[0][0].strip().splitlines()[-1])


def group_size(groups):
  """The number of devices in each all-reduce group, from any of XLA's spellings:
  {{0,1,...}}, [n,m]<=[k] (iota) or mesh['a'=8,'b'=1] {'a'}."""
  if groups.startswith("{{"):
    sizes = {len(g.split(",")) for g in re.findall(r"\{([\d,]+)\}", groups)}
    return sizes.pop() if len(sizes) == 1 else None
  if groups.startswith("mesh"):
    axes = dict((a, int(n)) for a, n in re.findall(r"'(\w+)'=(\d+)", groups))
    reduced = re.findall(r"'(\w+)'", groups.split("}")[0].split("{")[-1])
    size = 1
    for a in reduced:
      size *= axes[a]
    return size
  match = re.match(r"\[(\d+),(\d+)\]", groups)
  return int(match.group(2)) if match else None


def test_both_processes_form_one_mesh(report):
  assert report["processes_of_devices"] == [0, 1]


@pytest.mark.parametrize(
  "name", ["bloop", "hierarchical_bloop", "aggregators.upgrad_ema", "aggregators.mgda"]
)
def test_equals_one_device_and_all_reduces_only_scalars_across_processes(report, name):
  rep = report["transforms"][name]
  assert rep["params_max_diff"] < 1e-5
  assert rep["state_sharded_over_8"]
  assert rep["collective_ops"] == []  # no all-gather, reduce-scatter, ...
  assert rep["all_reduce_shapes"]
  for shape in rep["all_reduce_shapes"]:
    arrays = re.findall(r"\w+\[[^\]]*\]", shape)
    assert arrays and all(a.endswith("[]") for a in arrays), shape
  assert len(rep["all_reduce_groups"]) == len(rep["all_reduce_shapes"])
  for groups in rep["all_reduce_groups"]:
    assert group_size(groups) == 8, groups  # one group: the devices of both processes


def test_checkpoint_saved_by_both_processes_resumes_bit_for_bit(report):
  assert report["checkpoint"] is True
