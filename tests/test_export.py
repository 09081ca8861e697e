"""Every transform's update lowers for GPU and TPU (jax.export from this CPU
machine), with no host callback in the exported module."""

import re

import jax
import pytest

from tests import catalogue
from tests.catalogue import CASES
from tests.catalogue import IDS

PLATFORMS = ("cuda", "rocm", "tpu")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_update_exports_for_gpu_and_tpu_without_host_callbacks(case):
  if not hasattr(jax, "export"):
    pytest.skip(f"jax {jax.__version__} has no jax.export")
  tx = case.make()
  params = catalogue.params()
  state = tx.init(params)
  exported = jax.export.export(jax.jit(tx.update), platforms=PLATFORMS)(
    catalogue.grads(case), state, params
  )
  assert tuple(exported.platforms) == PLATFORMS
  module = exported.mlir_module()
  targets = set(re.findall(r"custom_call @(\w+)", module))
  # Device kernels only (e.g. the eigensolver of the aggregators' small
  # problems); a host callback would stall every step on the host.
  assert not {t for t in targets if "callback" in t.lower() or "host" in t.lower()}, targets
  assert "outfeed" not in module and "infeed" not in module
