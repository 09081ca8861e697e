"""The documentation site builds with warnings as errors, covers the API, and
reads right in a real browser (headless Chromium, no network)."""

import functools
import html
import html.parser
import http.server
import json
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import urllib.parse

import pytest

import bloop_optax
from tests import shared

ROOT = pathlib.Path(__file__).parent.parent


class _Links(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.links = []
    self.resources = []  # what the browser loads by itself: scripts, styles, images

  def handle_starttag(self, tag, attrs):
    # A <link> is fetched by itself only as a stylesheet or a preload.
    fetched = tag != "link" or dict(attrs).get("rel") in {"stylesheet", "preload"}
    for name, value in attrs:
      if (tag, name) in {("a", "href"), ("img", "src"), ("link", "href"), ("script", "src")}:
        self.links.append(value)
        if tag != "a" and value and fetched:
          self.resources.append(value)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  """The site, built once per session (the build writes into docs/, so two
  workers must not build at the same time)."""

  def build(out):
    done = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "-n", "--keep-going", "-q", "-b", "html", "docs", out],
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=False,
      timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

  return shared.built_once(tmp_path_factory, "docs_html", build)


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


# ------------------------------------------------------------ in a real browser

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MATHS_PAGES = ["index.html", "guide.html", "aggregators.html", "generated/bloop_optax.bloop.html"]
# Notes about machines, CI runs, earlier code or lending belong in commit messages.
INTERNAL_PHRASES = [
  "was lent",
  "not lent",
  "lent to this",
  "ci run",
  "a ci machine",
  "shared this",
  "this shared machine",
  "busy machine",
  "busier machine",
  "quiet machine",
  "the final code",
  "previous code",
  "earlier code",
  "its first version",
  "set by the tests",
  "bloop_quick",
]


def _pages(site):
  return sorted(
    str(p.relative_to(site))
    for p in site.rglob("*.html")
    if not p.name.startswith("_check") and "_modules" not in p.parts
  )


@pytest.fixture(scope="module")
def browser(site):
  """Loads pages of the built site in headless Chromium, served over HTTP on
  127.0.0.1 with every other host unresolvable (no network)."""
  binary = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
  if binary is None:
    pytest.skip(
      "headless Chromium not found: install Debian's `chromium` package"
      " (`apt-get install chromium`; .ci/run does) to run the browser checks"
    )
  shutil.copyfile(pathlib.Path(__file__).parent / "browser_check.html", site / "_check.html")
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
  handler.log_message = lambda *args: None
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()

  def inspect(pages, width):
    query = urllib.parse.urlencode({"width": width, "pages": ",".join(pages)})
    url = f"http://127.0.0.1:{server.server_port}/_check.html?{query}"
    done = subprocess.run(
      [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--virtual-time-budget=120000",
        "--dump-dom",
        url,
      ],
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
    )
    found = re.search(r'<pre id="result">(.*?)</pre>', done.stdout, re.S)
    assert found and found.group(1) != "pending", done.stderr[-2000:]
    return json.loads(html.unescape(found.group(1)))

  yield inspect
  server.shutdown()
  server.server_close()


@pytest.fixture(scope="module")
def desktop(site, browser):
  return browser(_pages(site), 1440)


def test_maths_is_typeset_without_network(desktop):
  for page in MATHS_PAGES:
    assert desktop[page]["raw"] == [], (page, desktop[page]["raw"][:3])
    assert desktop[page]["math"] > 0, page  # MathJax ran and typeset formulas


def test_every_figure_loads(site, desktop):
  shown = 0
  for page, found in desktop.items():
    assert "error" not in found, (page, found)
    broken = [image["src"] for image in found["images"] if not image["ok"]]
    assert not broken, (page, broken)
    shown += len(found["images"])
  committed = {p.name for p in (ROOT / "benchmarks" / "results").glob("*.png")}
  referenced = {
    name for page in site.rglob("*.html") for name in committed if name in page.read_text()
  }
  assert referenced == committed, committed - referenced  # every committed figure is shown
  assert shown >= len(committed)


def test_code_and_tables_fit_and_nothing_runs_off_the_page(desktop):
  for page, found in desktop.items():
    assert found["overflowing_code"] == [], (page, found["overflowing_code"])
    assert found["overflowing_tables"] == [], (page, found["overflowing_tables"])
    assert found["page_width"] <= found["viewport"], page


def test_phone_width_cuts_nothing(browser):
  pages = ["index.html", "guide.html", "benchmarks/index.html", "benchmarks/speed.html"]
  for page, found in browser([*pages, *MATHS_PAGES[2:]], 390).items():
    assert found["page_width"] <= found["viewport"], page  # code scrolls inside its box
    assert found["raw"] == [], page


def test_search_returns_results(browser):
  found = browser(["search.html?q=ema_decay"], 1440)["search.html?q=ema_decay"]
  assert found["search_results"] >= 5, found


def test_pages_load_nothing_from_the_network(site):
  for page in site.rglob("*.html"):
    parser = _Links()
    parser.feed(page.read_text())
    remote = [link for link in parser.resources if link.startswith(("http:", "https:", "//"))]
    assert not remote, (page.name, remote)


def test_no_page_holds_internal_notes(site):
  for page in site.rglob("*.html"):
    text = page.read_text().lower()
    found = [phrase for phrase in INTERNAL_PHRASES if phrase in text]
    assert not found, (str(page.relative_to(site)), found)
