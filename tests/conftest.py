"""Fixtures the test modules share, and the test session's XLA setting."""

import os

# The tests compile hundreds of small programs and run each for milliseconds:
# LLVM's optimisation of the generated CPU code is about a third of their
# compile time and buys nothing here. XLA reads the flag when it starts its
# backend, after this file is imported (a flag the caller set is kept).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
  ).strip()

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def strict_dtype_promotion(request):
  """Our code must not rely on implicit dtype promotion (optax's adam does: a test
  marked ``optax_optimizer`` runs under the standard rules)."""
  mode = "standard" if request.node.get_closest_marker("optax_optimizer") else "strict"
  with jax.numpy_dtype_promotion(mode):
    yield


# Under pytest -n 2 each file runs on one worker (--dist loadfile, set in
# pyproject.toml). The files that take longest start first, so that the two
# workers finish together instead of one finishing a long file alone.
LONGEST_FIRST = (
  "test_aggregators.py",
  "test_contract.py",
  "test_sharding.py",
  "test_shared_params.py",
  "test_transforms.py",
  "test_frameworks.py",
  "test_aggregators_by_rule.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable
