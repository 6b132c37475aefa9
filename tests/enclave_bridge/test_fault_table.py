"""The fault table: every row is backed by tests that carry its marker, and the README shows it."""

from __future__ import annotations

import ast
import pathlib

import pytest

from enclave_bridge import fault_table as ft
from tests.helpers import readme

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _decorator_marks(fn: ast.FunctionDef) -> dict[str, list]:
  """``{mark name: [its positional string arguments]}`` of ``@pytest.mark.<name>(...)``."""
  marks: dict[str, list] = {}
  for d in fn.decorator_list:
    call = d if isinstance(d, ast.Call) else None
    attr = call.func if call else d
    if isinstance(attr, ast.Attribute) and ast.unparse(attr).startswith("pytest.mark."):
      args = [a.value for a in (call.args if call else []) if isinstance(a, ast.Constant)]
      marks.setdefault(attr.attr, []).extend(args)
  return marks


def _marked_tests() -> dict[str, dict[str, list]]:
  """``{"path::function": marks}`` of every test in tests/ that carries a fault mark."""
  found = {}
  for path in sorted((ROOT / "tests").rglob("test_*.py")):
    for node in ast.parse(path.read_text()).body:
      if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
        marks = _decorator_marks(node)
        if "fault" in marks:
          found[f"{path.relative_to(ROOT)}::{node.name}"] = marks
  return found


MARKED = _marked_tests()


@pytest.mark.parametrize("key", list(ft.FAULTS))
def test_every_row_is_backed_by_default_suite_tests_carrying_its_mark(key):
  for test in ft.FAULTS[key].tests:
    assert test in MARKED, f"{test} (row {key!r}) does not exist or has no fault mark"
    assert key in MARKED[test]["fault"], f"{test} lacks @pytest.mark.fault({key!r})"
    assert "slow" not in MARKED[test], f"{test} is slow: row {key!r} needs a default test"


def test_every_fault_mark_names_a_row_that_lists_the_test():
  assert MARKED, "no test carries a fault mark"
  for test, marks in MARKED.items():
    for key in marks["fault"]:
      assert key in ft.FAULTS, f"{test} marks an unknown fault {key!r}"
      assert test in ft.FAULTS[key].tests, f"row {key!r} does not list {test}"


def test_rows_are_validated():
  with pytest.raises(ValueError, match="names no test"):
    ft.Fault("x", "f", "s", None, "nothing", ())
  with pytest.raises(ValueError, match="within_s must be > 0"):
    ft.Fault("x", "f", "s", 0.0, "nothing", ("t",))
  assert ft.bound("driver_sigkill") == 2.0
  with pytest.raises(ValueError, match="no time bound"):
    ft.bound("replayed_frames")
  with pytest.raises(KeyError, match="unknown fault 'enclave_sigkil'; the table has enclave"):
    ft.bound("enclave_sigkil")


def test_markdown_table_has_a_row_per_fault():
  lines = ft.markdown_table().splitlines()
  assert lines[0] == "| fault | what the user sees | time to the error | what is lost | tests |"
  assert len(lines) == 2 + len(ft.FAULTS)
  for line, f in zip(lines[2:], ft.FAULTS.values()):
    cells = [c.strip() for c in line.strip("|").split(" | ")]
    assert cells[0] == f.fault and cells[2] == f.time_to_error and cells[3] == f.lost
    assert cells[4].count("`") == 2 * len(f.tests)


def test_readme_fault_table_is_generated_from_the_module():
  readme.assert_block_is_current("faults", ft.markdown_table(), "enclave_bridge.fault_table")


def test_module_prints_the_table():
  readme.assert_module_prints("enclave_bridge.fault_table", ft.markdown_table())
