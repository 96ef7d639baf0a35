"""Runs the docstring examples of jlora's core modules as tests.

The modules are listed explicitly (a module that fails to import fails the
test; nothing is skipped). Modules that import Keras or Flax (jlora.keras,
recipes.models.llama, recipes.models.bert) run their examples in their own test files.
"""

import doctest
import importlib

import pytest

MODULES = [
    "jlora",
    "jlora._src.leaf",
    "jlora._src.paths",
    "jlora._src.apply",
    "jlora._src.tree",
    "jlora._src.optim",
    "jlora._src.transform",
    "jlora._src.specs",
    "jlora._src.checkpoint",
    "jlora._src.peft",
    "recipes.models.gemma",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                           raise_on_error=False, verbose=False, report=True)
  assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
  assert result.attempted > 0, f"{name} has no docstring examples"
