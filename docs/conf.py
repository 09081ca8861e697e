"""Sphinx configuration of the bloop_optax documentation.

Build it with ``python -m sphinx -W -n -b html docs docs/_build/html`` from the
repository root (the test suite does exactly that, into a temporary folder).
The committed notebooks are rendered with their stored outputs, never
executed.
"""

import pathlib
import shutil
import sys

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import bloop_optax  # noqa: E402

project = "bloop_optax"
author = "bloop_optax developers"
copyright = "2026, bloop_optax developers"
release = version = bloop_optax.__version__

extensions = [
  "myst_nb",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.mathjax",
  "sphinx.ext.napoleon",
]

# The notebooks live in ../notebooks (the tests execute them there); Sphinx
# reads sources only inside this folder, so they are copied in, unexecuted.
_notebooks = HERE / "notebooks"
_notebooks.mkdir(exist_ok=True)
for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
  shutil.copyfile(notebook, _notebooks / notebook.name)

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

autosummary_generate = True
autodoc_typehints = "none"  # types are stated in each docstring's Args
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

nitpicky = True
# Names the docstrings mention that live in other projects (no network for
# intersphinx inventories in the build).
nitpick_ignore_regex = [
  (r"py:.*", r"(jax|optax|flax|numpy|np|jnp)\..*"),
  (r"py:class", r"(PyTree|Any|ArrayLike|Callable|NamedTuple)"),
]

html_theme = "furo"
html_title = f"bloop_optax {version}"
templates_path = ["_templates"]
