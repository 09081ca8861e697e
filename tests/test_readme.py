"""The README's promises: two set-up commands, CI runs the test one, and every
Python block of the README and of the documentation runs on its own."""

import pathlib
import subprocess
import sys

import pytest

from tests.helpers import blocks

ROOT = pathlib.Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_exactly_two_setup_commands_and_ci_runs_the_test_one():
  commands = [b.strip() for b in blocks(README, "bash")]
  assert len(commands) == 2
  main_job, tests = commands
  assert all(c.startswith("python3 -m venv .venv && ") for c in commands)
  assert "benchmarks.experiments" in main_job and "pytest" in tests
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  assert tests in ci  # verbatim, as its own line


# The framework pages' examples run, as scripts and with assertions on what they
# print, in tests/test_frameworks.py.
FRAMEWORK_PAGES = {"flax_nnx.md", "flax_linen.md", "equinox.md"}
PAGES = [
  ROOT / "README.md",
  *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name not in FRAMEWORK_PAGES),
]
CASES = [
  pytest.param(code, id=f"{page.name}:{i}")
  for page in PAGES
  for i, code in enumerate(blocks(page.read_text(), "python"))
]


@pytest.mark.parametrize("code", CASES)
def test_each_python_block_runs_on_its_own(code, tmp_path):
  done = subprocess.run(
    [sys.executable, "-c", code],
    cwd=tmp_path,  # nothing from the checkout but the installed package
    capture_output=True,
    text=True,
    check=False,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]


def test_the_quickstart_trains():
  (code,) = blocks(README, "python")[:1]
  done = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
  )
  main = float(done.stdout.split()[0])
  assert main < 0.5  # a tenth of the zero predictor's loss (mean y**2, about 5)
