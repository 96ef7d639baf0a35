"""jlora's version: the installed package's metadata (pyproject.toml's `version`), read once."""

from __future__ import annotations

import importlib.metadata


def _installed() -> str:
  try:
    return importlib.metadata.version("jlora")
  except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    return "0+unknown"


VERSION: str = _installed()
