"""The analysis sits below the playbook procedures: no module of
tuning_playbook/analysis imports tuning_playbook.procedures, by an import
statement or by a module name handed to importlib (the procedures import the
analysis; the entry points hand a procedure's hook to the report)."""

import ast
import glob
import os

import pytest

from tests import helpers

ANALYSIS = os.path.join(helpers.REPO, "tuning_playbook", "analysis")
PROCEDURES = "tuning_playbook.procedures"
# The package the analysis modules are in, for relative imports.
ANALYSIS_PACKAGE = "tuning_playbook.analysis"


def _names_procedures(module: str) -> bool:
  return module == PROCEDURES or module.startswith(PROCEDURES + ".")


def _absolute(module: str | None, level: int) -> str:
  """The absolute name of `from <level dots><module> import ...` in the
  analysis package."""
  if not level:
    return module or ""
  parts = ANALYSIS_PACKAGE.split(".")
  base = parts[:len(parts) - level + 1]
  return ".".join(base + ([module] if module else []))


def _string(node: ast.AST) -> str | None:
  """The text of a string constant, or of an f-string's constant parts."""
  if isinstance(node, ast.Constant) and isinstance(node.value, str):
    return node.value
  if isinstance(node, ast.JoinedStr):
    return "".join(v.value for v in node.values
                   if isinstance(v, ast.Constant) and isinstance(v.value, str))
  return None


def _is_import_call(node: ast.Call) -> bool:
  func = node.func
  name = (func.attr if isinstance(func, ast.Attribute) else
          func.id if isinstance(func, ast.Name) else None)
  return name in ("import_module", "__import__")


def procedure_imports(source: str) -> list[str]:
  """`line: what` for each import of tuning_playbook.procedures in `source`."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found += [f"{node.lineno}: import {a.name}" for a in node.names
                if _names_procedures(a.name)]
    elif isinstance(node, ast.ImportFrom):
      module = _absolute(node.module, node.level)
      found += [f"{node.lineno}: from {module} import {a.name}"
                for a in node.names
                if _names_procedures(module) or _names_procedures(
                    f"{module}.{a.name}")]
    elif isinstance(node, ast.Call) and _is_import_call(node):
      text = next((s for s in map(_string, node.args) if s), "")
      if "procedures" in text.split(".") or _names_procedures(text):
        found.append(f"{node.lineno}: import_module({text!r})")
    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
      # A module name kept in a string, to be imported by name later.
      if _names_procedures(node.value):
        found.append(f"{node.lineno}: module name {node.value!r}")
  return found


@pytest.mark.parametrize("source", [
    "from tuning_playbook import procedures",
    "from tuning_playbook import study, procedures as p",
    "import tuning_playbook.procedures.lr_sweep",
    "from tuning_playbook.procedures import from_study",
    "from .. import procedures",
    "from ..procedures import lr_sweep",
    "importlib.import_module('tuning_playbook.procedures')",
    "importlib.import_module(f'tuning_playbook.procedures.{name}')",
    "importlib.import_module('.procedures', 'tuning_playbook')",
    "__import__('tuning_playbook.procedures.warmup')",
    "PACKAGE = 'tuning_playbook.procedures'",
])
def test_the_scan_sees_every_form_of_import(source):
  assert procedure_imports(source)


@pytest.mark.parametrize("source", [
    "from tuning_playbook import study\nfrom . import report_html",
    "importlib.import_module('tuning_playbook.analysis.plots')",
    "x = 'see tuning_playbook/procedures'",
])
def test_the_scan_passes_other_imports(source):
  assert not procedure_imports(source)


def test_the_analysis_does_not_import_the_procedures():
  paths = sorted(glob.glob(os.path.join(ANALYSIS, "*.py")))
  assert len(paths) > 10
  found = {}
  for path in paths:
    with open(path) as f:
      hits = procedure_imports(f.read())
    if hits:
      found[os.path.relpath(path, helpers.REPO)] = hits
  assert not found, found
