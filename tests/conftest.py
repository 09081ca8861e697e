"""Fixtures the test modules share."""

import jax
import pytest


@pytest.fixture
def strict_dtype_promotion(request):
  """Our code must not rely on implicit dtype promotion (optax's adam does: a test
  marked ``optax_optimizer`` runs under the standard rules)."""
  mode = "standard" if request.node.get_closest_marker("optax_optimizer") else "strict"
  with jax.numpy_dtype_promotion(mode):
    yield
