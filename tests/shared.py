"""Expensive test inputs made once per test session, across pytest-xdist workers."""

from collections.abc import Callable
import fcntl
import os
import pathlib
import shutil

import pytest


def built_once(
  factory: pytest.TempPathFactory, name: str, build: Callable[[pathlib.Path], None]
) -> pathlib.Path:
  """Runs ``build(folder)`` once per session and returns the folder.

  Workers share the session's base temporary folder; the first to take the
  lock builds, the others wait and reuse its result. A failed build leaves no
  marker, so the next worker tries again (and fails with its own message).
  """
  root = factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  folder = root / name
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (root / f"{name}.done").exists():
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir()
      build(folder)
      (root / f"{name}.done").touch()
  return folder
