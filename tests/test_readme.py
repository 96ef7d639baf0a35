"""Runs the code examples of README.md.

How: README.md is cut into sections at its `## ` headings. Within a section,
every ```python block runs in order in one namespace (a fresh namespace per
section, so each section is self-contained); the section's printed output is
captured, and every line of each ```text block in that section must appear in
it. ```bash blocks are not run. Each section runs in a fresh temporary directory.
"""

import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"^```(\w+)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)


def _sections():
  text = README.read_text()
  parts = re.split(r"^## ", text, flags=re.MULTILINE)
  out = []
  for part in parts[1:]:
    title = part.splitlines()[0].strip()
    blocks = [(lang, code) for lang, code in _BLOCK.findall(part)]
    if any(lang == "python" for lang, _ in blocks):
      out.append(pytest.param(blocks, id=title))
  return out


SECTIONS = _sections()


def test_readme_has_examples():
  names = [p.id for p in SECTIONS]
  assert len(names) >= 4 and any(n.startswith("Quickstart") for n in names), names


@pytest.mark.parametrize("blocks", SECTIONS)
def test_readme_section(blocks, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # examples that write files write them here
  namespace = {"__name__": "readme"}
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    for lang, code in blocks:
      if lang == "python":
        exec(compile(code, str(README), "exec"), namespace)
  printed = stdout.getvalue().splitlines()
  for lang, code in blocks:
    if lang == "text":
      for line in code.splitlines():
        assert line in printed, f"README shows {line!r}, but the code printed:\n{stdout.getvalue()}"
