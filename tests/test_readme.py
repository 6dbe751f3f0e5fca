"""The README's Python examples run, in order, as one script."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
  assert len(python_blocks()) >= 4


def test_readme_python_examples_run():
  namespace = {}
  for i, block in enumerate(python_blocks()):
    try:
      exec(compile(block, f"README.md block {i}", "exec"), namespace)  # pylint: disable=exec-used
    except Exception as e:  # pylint: disable=broad-except
      raise AssertionError(f"README python block {i} failed:\n{block}") from e


def test_readme_shows_the_ci_test_command():
  ci = (README.parent / ".ci" / "run").read_text()
  assert "python -m pytest -q" in README.read_text()
  assert ".venv/bin/python -m pytest -q" in ci
