"""The suite's warning policy (pyproject.toml): a warning attributed to this
project's code fails the run; one raised inside a third-party package is shown
and does not."""

import warnings

import pytest


def _warn_from(module_name):
  namespace = {"__name__": module_name, "warnings": warnings}
  exec(compile("warnings.warn('deprecated', DeprecationWarning)", module_name, "exec"), namespace)


@pytest.mark.parametrize(
  "module", ["bloop_optax._bloop", "tests.test_transforms", "benchmarks.tasks"]
)
def test_our_warnings_are_errors(module):
  with pytest.raises(DeprecationWarning):
    _warn_from(module)


def test_third_party_warnings_are_shown_not_raised():
  with pytest.warns(DeprecationWarning):
    _warn_from("orbax.checkpoint")
  _warn_from("orbax.checkpoint")  # outside pytest.warns: reported, not an error
