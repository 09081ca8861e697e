"""The documentation site builds with warnings as errors and covers the API."""

import html.parser
import pathlib
import subprocess
import sys

import pytest

import bloop_optax

ROOT = pathlib.Path(__file__).parent.parent


class _Links(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.links = []

  def handle_starttag(self, tag, attrs):
    for name, value in attrs:
      if (tag, name) in {("a", "href"), ("img", "src"), ("link", "href"), ("script", "src")}:
        self.links.append(value)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  out = tmp_path_factory.mktemp("docs") / "html"
  done = subprocess.run(
    [
      sys.executable,
      "-m",
      "sphinx",
      "-W",
      "-n",
      "--keep-going",
      "-q",
      "-b",
      "html",
      "docs",
      str(out),
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=False,
    timeout=900,
  )
  assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
  return out


def test_every_public_name_has_an_api_page(site):
  for name in bloop_optax.__all__:
    page = site / "generated" / f"bloop_optax.{name}.html"
    assert page.exists(), name
    assert f"bloop_optax.{name}" in page.read_text()
  for name in bloop_optax.aggregators.__all__:
    page = site / "generated" / f"bloop_optax.aggregators.{name}.html"
    assert page.exists(), name
    assert f"bloop_optax.aggregators.{name}" in page.read_text()


def test_no_internal_link_is_broken(site):
  broken = []
  for page in site.rglob("*.html"):
    parser = _Links()
    parser.feed(page.read_text())
    for link in parser.links:
      if not link or link.startswith(("http://", "https://", "mailto:", "#", "data:")):
        continue
      target = (page.parent / link.split("#")[0].split("?")[0]).resolve()
      if not target.exists():
        broken.append(f"{page.relative_to(site)} -> {link}")
  assert not broken, broken[:20]


def test_guide_and_notebooks_are_rendered(site):
  guide = (site / "guide.html").read_text()
  assert "track_cosine" in guide and "skipped_steps" in guide
  which = (site / "aggregators.html").read_text()
  assert "ema_decay" in which and "<img" in which
  for name in ("quickstart", "figure2", "pareto"):
    page = site / "notebooks" / f"{name}.html"
    assert page.exists() and "<img" in page.read_text(), name  # stored outputs, plots included
