"""The README's promises: two set-up commands, CI runs the test one, the code runs."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def blocks(language):
  return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_exactly_two_setup_commands_and_ci_runs_the_test_one():
  commands = [b.strip() for b in blocks("bash")]
  assert len(commands) == 2
  main_job, tests = commands
  assert all(c.startswith("python3 -m venv .venv && ") for c in commands)
  assert "benchmarks.experiments" in main_job and "pytest" in tests
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  assert tests in ci  # verbatim, as its own line


@pytest.mark.optax_optimizer
def test_python_blocks_run_in_order():
  namespace = {}
  for code in blocks("python"):
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    if "main" in namespace:  # each training block beats predicting zero by far
      zero_predictor = float((namespace["y"] ** 2).mean())
      assert float(namespace["main"]) < 0.5 * zero_predictor, code[:60]
