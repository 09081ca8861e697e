"""Every notebook executes top to bottom in its quick setting (BLOOP_QUICK=1)."""

import os
import pathlib

from nbclient import NotebookClient
import nbformat
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_the_notebooks_are_there():
  assert {p.name for p in NOTEBOOKS} >= {
    "quickstart.ipynb",
    "figure2.ipynb",
    "pareto.ipynb",
  }


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, monkeypatch):
  monkeypatch.setenv("BLOOP_QUICK", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  notebook = nbformat.read(path, as_version=4)
  client = NotebookClient(
    notebook,
    timeout=600,
    kernel_name="python3",
    resources={"metadata": {"path": str(path.parent)}},
  )
  client.execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any(o.output_type == "stream" for o in outputs)  # it printed its numbers
  assert os.environ["BLOOP_QUICK"] == "1"
