"""Release metadata: one version everywhere, a valid citation, a wheel that works."""

import importlib.metadata
import pathlib
import re
import subprocess
import sys
import zipfile

import pytest
import tomllib

import bloop_optax

ROOT = pathlib.Path(__file__).parent.parent


def test_one_version_everywhere():
  version = bloop_optax.__version__
  assert importlib.metadata.version("bloop_optax") == version
  citation = (ROOT / "CITATION.cff").read_text()
  assert re.search(rf"^version: {re.escape(version)}$", citation, re.M)
  assert f"## [{version}]" in (ROOT / "CHANGELOG.md").read_text()
  pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert "version" in pyproject["project"]["dynamic"]  # read from bloop_optax.__version__


def test_licence_and_metadata():
  pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  assert pyproject["license"] == "Apache-2.0" and pyproject["license-files"] == ["LICENSE"]
  text = (ROOT / "LICENSE").read_text()
  assert "Apache License" in text and "Version 2.0, January 2004" in text
  assert "END OF TERMS AND CONDITIONS" in text
  assert any(c.startswith("Operating System :: OS Independent") for c in pyproject["classifiers"])
  assert pyproject["keywords"] and pyproject["urls"]


def test_citation_file_validates():
  done = subprocess.run(
    [
      str(pathlib.Path(sys.executable).parent / "cffconvert"),
      "--validate",
      "-i",
      str(ROOT / "CITATION.cff"),
    ],
    capture_output=True,
    text=True,
    check=False,
  )
  assert done.returncode == 0, done.stdout + done.stderr
  assert "valid" in done.stdout


@pytest.mark.slow  # builds a wheel and a virtual environment: the slow tier
def test_wheel_installs_into_a_fresh_environment_and_holds_only_the_package(tmp_path):
  dist = tmp_path / "dist"
  build = subprocess.run(
    [sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(dist), str(ROOT)],
    capture_output=True,
    text=True,
    check=False,
    timeout=900,
  )
  assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
  (wheel,) = dist.glob("*.whl")
  (sdist,) = dist.glob("*.tar.gz")
  assert bloop_optax.__version__ in wheel.name and bloop_optax.__version__ in sdist.name
  names = zipfile.ZipFile(wheel).namelist()
  package = [n for n in names if not n.startswith("bloop_optax-")]
  assert all(n.startswith("bloop_optax/") for n in package), package
  assert "bloop_optax/py.typed" in package and "bloop_optax/_bloop.py" in package
  assert not any(n.endswith(".ipynb") or "tests/" in n or "benchmarks/" in n for n in names)
  assert any(n.endswith("licenses/LICENSE") for n in names)

  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
  python = venv / "bin" / "python"
  install = subprocess.run(
    [str(python), "-m", "pip", "install", "-q", str(wheel)],
    capture_output=True,
    text=True,
    check=False,
    timeout=1200,
  )
  assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
  script = (
    "import bloop_optax, jax.numpy as jnp, optax\n"
    "print(bloop_optax.__version__)\n"
    "print(bloop_optax.__file__)\n"
    "tx = optax.chain(bloop_optax.bloop(1.0, ema_decay=0.0), optax.sgd(1.0))\n"
    "p = {'w': jnp.zeros(2)}\n"
    "g = bloop_optax.MainAux({'w': jnp.array([1.0, 0.0])}, {'w': jnp.array([3.0, 4.0])})\n"
    "u, _ = tx.update(g, tx.init(p), p)\n"
    "print(u['w'].tolist())\n"
  )
  run = subprocess.run(
    [str(python), "-c", script], cwd=tmp_path, capture_output=True, text=True, check=False
  )
  assert run.returncode == 0, run.stderr[-2000:]
  version, location, update = run.stdout.strip().splitlines()[-3:]
  assert version == bloop_optax.__version__
  assert str(venv) in location  # the wheel's copy, not this checkout
  assert update == "[-1.0, -4.0]"  # -(M + (A - (<M, A> / <M, M>) M))


@pytest.mark.parametrize("script", ["experiments", "speed"])
def test_benchmark_scripts_explain_every_flag(script):
  done = subprocess.run(
    [sys.executable, "-m", f"benchmarks.{script}", "--help"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=True,
  )
  flags = re.findall(r"^\s+(--[\w-]+)", done.stdout, re.M)
  assert flags and "--out" in flags
  for flag in flags:
    if flag == "--help":
      continue
    line = next(line for line in done.stdout.splitlines() if line.strip().startswith(flag))
    block = done.stdout[done.stdout.index(line) :].split("\n  -")[0]
    assert len(block.split()) > 4, f"{flag} has no help text"
    assert "default" in block or "store_true" not in block, flag
