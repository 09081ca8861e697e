"""Fixtures the test modules share, and the test session's XLA setting."""

import os

import jax
import pytest


def pytest_configure(config):
  """The default tier compiles hundreds of small programs and runs each for
  milliseconds: LLVM's optimisation of the generated CPU code is about a third
  of their compile time and buys nothing there. The slow tier (minutes-long
  training runs) keeps it. XLA reads the flag when it starts its backend, at
  the first computation, after this hook (a flag the caller set is kept)."""
  if "slow" in config.getoption("markexpr", "").replace("not slow", ""):
    return
  if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()


# Scripts the tests run in subprocesses. --doctest-modules would import them
# into the test session, and sharding_worker's first line (8 forced devices, in
# place of the flag that pytest_configure sets) would then hold for every test that follows.
collect_ignore = ["sharding_worker.py", "multiprocess_worker.py"]


@pytest.fixture
def strict_dtype_promotion(request):
  """Our code must not rely on implicit dtype promotion (optax's adam does: a test
  marked ``optax_optimizer`` runs under the standard rules)."""
  mode = "standard" if request.node.get_closest_marker("optax_optimizer") else "strict"
  with jax.numpy_dtype_promotion(mode):
    yield
