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
  "sphinx.ext.viewcode",
  "sphinx_copybutton",
  # MathJax served from the build (``_static/mathjax``), so formulas render
  # with no network; the path is set to its SVG output in ``setup`` below.
  "sphinx-mathjax-offline",
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
nb_render_markdown_format = "myst"  # tables printed by the notebooks render as tables
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

autosummary_generate = True
# The API pages are generated afresh on every build: a page left from a renamed
# or removed name would otherwise fail the build.
shutil.rmtree(HERE / "generated", ignore_errors=True)
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_typehints_format = "short"
# The package has no type comments; Sphinx's parser of them misreads the raw
# docstrings' backslashes on Python 3.13 and drops those signatures.
autodoc_use_type_comments = False
autodoc_type_aliases = {"ScalarOrSchedule": "optax.ScalarOrSchedule", "PyTree": "PyTree"}
add_module_names = False
toc_object_entries_show_parents = "hide"
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
  (r"py:class", r"(collections\.abc|typing)\..*"),
]

html_theme = "furo"
html_title = f"bloop_optax {version}"
templates_path = ["_templates"]
html_static_path = ["_static"]
html_css_files = ["custom.css"]
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True


_ARRAY_LIKE = {"Array", "ndarray", "bool", "number", "int", "float", "complex"}


def _short_types(app, domain, objtype, contentnode):
  """Shows ``jax.typing.ArrayLike`` by its name instead of its eight members."""
  document = getattr(app.env, "current_document", None)
  annotations = getattr(document, "autodoc_annotations", None)
  if annotations is None:
    annotations = app.env.temp_data.get("annotations", {})
  for hints in annotations.values():
    for name, hint in hints.items():
      parts = [part.strip() for part in hint.split("|")]
      bare = [part.lstrip("~").rsplit(".", 1)[-1] for part in parts]
      if _ARRAY_LIKE <= set(bare):
        rest = [p for p, b in zip(parts, bare, strict=True) if b not in _ARRAY_LIKE]
        hints[name] = " | ".join(["ArrayLike", *dict.fromkeys(rest)])


def setup(app):
  # SVG output needs no web fonts, so the maths also renders from file://.
  app.config.mathjax_path = "mathjax/tex-svg.js"
  app.connect("object-description-transform", _short_types, priority=400)
