"""Every notebook runs top to bottom from the INSTALLED package, as a user runs it.

The package is built into a wheel and installed into a fresh virtual
environment; the notebooks' other dependencies (the ``notebooks`` extra) come
from this environment's site-packages, added as a plain path so that this
checkout's editable install is not seen. The kernel starts in an empty folder,
so nothing of the repository is importable: a notebook that imported from
``benchmarks/`` or relied on the working directory fails here. Set
``BLOOP_NOTEBOOK_PYTHON`` to the Python of an environment made with
``pip install ".[notebooks]"`` to run them there instead (``.ci/run`` does).

Quick mode: each notebook's first code cell, tagged ``parameters``, holds its
settings; the test runs a cell after it that shrinks them (fewer steps or
chains), and nothing inside the notebooks knows about tests.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

from nbclient import NotebookClient
import nbformat
import pytest

from tests import shared

ROOT = pathlib.Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
QUICK = {
  "quickstart": "STEPS = 40",
  "figure2": "CHAINS = 64",
  "pareto": "STEPS, SEEDS, AUX_WEIGHTS = 30, 1, (0.01, 1.0)",
}
CHECK = "import bloop_optax, json, sys; print(json.dumps([bloop_optax.__file__, sys.path]))"


@pytest.fixture(scope="module")
def kernel_python(tmp_path_factory):
  given = os.environ.get("BLOOP_NOTEBOOK_PYTHON")
  if given:
    return pathlib.Path(given)
  return shared.built_once(tmp_path_factory, "notebook_venv", _install) / "venv" / "bin" / "python"


def _install(tmp):
  # Build from a copy: a build in the checkout writes build/ and *.egg-info there.
  source = tmp / "source"
  shutil.copytree(ROOT / "bloop_optax", source / "bloop_optax")
  for name in ("pyproject.toml", "README.md", "LICENSE"):
    shutil.copyfile(ROOT / name, source / name)
  subprocess.run(
    [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"), str(source)],
    check=True,
    timeout=300,
  )
  (wheel,) = (tmp / "dist").glob("bloop_optax-*.whl")
  venv = tmp / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  python = venv / "bin" / "python"
  pip = [sys.executable, "-m", "pip", "--python", str(python)]
  subprocess.run([*pip, "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300)
  site = subprocess.run(
    [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  # A plain path line: this environment's packages without running its .pth
  # files, so its editable bloop_optax (the checkout) stays out of sight.
  (pathlib.Path(site) / "_notebook_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")


def test_the_notebooks_are_there():
  assert {p.stem for p in NOTEBOOKS} == set(QUICK)


# A minute of kernels: the slow tier (.ci/run runs it once, in the notebooks' own
# environment).
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_from_the_installed_package(path, kernel_python, tmp_path, monkeypatch):
  notebook = nbformat.read(path, as_version=4)
  cells = notebook.cells
  (first,) = [i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])]
  assert first == next(i for i, c in enumerate(cells) if c.cell_type == "code")
  assert "bloop_quick" not in json.dumps(notebook).lower()
  cells.insert(first + 1, nbformat.v4.new_code_cell(QUICK[path.stem]))
  cells.append(nbformat.v4.new_code_cell(CHECK))
  kernels = tmp_path / "kernels" / "installed"
  kernels.mkdir(parents=True)
  (kernels / "kernel.json").write_text(
    json.dumps(
      {
        "argv": [str(kernel_python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "installed bloop_optax",
        "language": "python",
      }
    )
  )
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
  monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel draws inline, as in Jupyter
  monkeypatch.delenv("PYTHONPATH", raising=False)
  work = tmp_path / "work"
  work.mkdir()
  client = NotebookClient(
    notebook,
    timeout=600,
    kernel_name="installed",
    resources={"metadata": {"path": str(work)}},
  )
  client.execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs)  # it drew its plots
  module, path_list = json.loads(notebook.cells[-1].outputs[0]["text"])
  assert not pathlib.Path(module).is_relative_to(ROOT / "bloop_optax"), module  # installed copy
  assert str(ROOT) not in path_list
