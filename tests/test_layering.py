"""The package's layers (README, Layout): each module of tuning_playbook
imports only from its own layer or those below it, and `training` and
`studies`, side by side, import neither the other."""

import ast
import os

import pytest

from tests import helpers

PACKAGE = os.path.join(helpers.REPO, "tuning_playbook")
INTERFACE = ("config_schema", "config_paths", "workload", "layers",
             "batch_norm", "input_pipeline", "image_preprocessing",
             "study_presets")
ENTRY_POINTS = ("main", "sweep", "playbook", "analyze", "study_worker")
# Layer of each subpackage; training and studies share one.
SUBPACKAGES = {"common": 1, "training": 2, "studies": 2, "analysis": 3,
               "procedures": 4}


def _module_name(path: str) -> str:
  relative = os.path.relpath(path, helpers.REPO)[:-len(".py")]
  name = relative.replace(os.sep, ".")
  return name[:-len(".__init__")] if name.endswith(".__init__") else name


def _layer(module: str) -> tuple[int, str] | None:
  """(layer, group) of a tuning_playbook module; None for the package itself."""
  parts = module.split(".")
  if parts[0] != "tuning_playbook" or len(parts) == 1:
    return None
  if parts[1] in SUBPACKAGES:
    return SUBPACKAGES[parts[1]], parts[1]
  if parts[1] in INTERFACE:
    return 0, "interface"
  if parts[1] in ENTRY_POINTS:
    return 5, "entry"
  raise AssertionError(f"{module}: not in any layer of the README's Layout")


def _exists(module: str) -> bool:
  path = os.path.join(helpers.REPO, *module.split("."))
  return os.path.exists(path + ".py") or os.path.isdir(path)


def _imports(source: str) -> list[tuple[int, str]]:
  """(line, module) of each tuning_playbook module `source` imports."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for alias in node.names:
        candidate = f"{node.module}.{alias.name}"
        found.append((node.lineno,
                      candidate if _exists(candidate) else node.module))
  return [(line, m) for line, m in found if m.startswith("tuning_playbook.")]


def upward_imports(source: str, module: str) -> list[str]:
  """The imports of `module` (its `source`) that reach above its layer, or
  across from `training` to `studies` or back."""
  own = _layer(module)
  bad = []
  for line, imported in _imports(source):
    other = _layer(imported)
    if own is None or other is None:
      continue
    if other[0] > own[0] or (other[0] == own[0] and other[1] != own[1]
                             and own[1] in ("training", "studies")):
      bad.append(f"{module}:{line} imports {imported}")
  return bad


def _sources():
  for root, _, files in os.walk(PACKAGE):
    for name in sorted(files):
      if name.endswith(".py"):
        yield os.path.join(root, name)


def test_no_module_imports_a_layer_above_it():
  bad = [line for path in _sources()
         for line in upward_imports(open(path).read(), _module_name(path))]
  assert not bad, "\n".join(bad)


def test_every_subpackage_says_what_it_owns():
  for name in SUBPACKAGES:
    tree = ast.parse(open(os.path.join(PACKAGE, name, "__init__.py")).read())
    assert len(ast.get_docstring(tree) or "") > 80, name


@pytest.mark.parametrize("source,module", [
    ("from tuning_playbook.studies import study\n", "tuning_playbook.common.x"),
    ("from tuning_playbook.training import train\n", "tuning_playbook.studies.x"),
    ("from tuning_playbook.studies import tracking\n", "tuning_playbook.training.x"),
    ("from tuning_playbook import sweep\n", "tuning_playbook.training.x"),
    ("import tuning_playbook.procedures.lr_sweep\n", "tuning_playbook.analysis.x"),
    ("from tuning_playbook.common import records\n", "tuning_playbook.workload"),
])
def test_the_check_sees_an_upward_import(source, module):
  assert len(upward_imports(source, module)) == 1


def test_the_check_lets_downward_imports_pass():
  source = ("from tuning_playbook import config_schema\n"
            "from tuning_playbook.common import records\n"
            "from tuning_playbook.training import train\n")
  assert upward_imports(source, "tuning_playbook.study_worker") == []
  assert upward_imports(source, "tuning_playbook.training.run") == []


MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
# Functions that are config literals (a key per line), exempt from the limit.
CONFIG_LITERALS = ("get_config", "base_config")


def oversized(source: str, name: str) -> list[str]:
  """A module over MAX_MODULE_LINES, and its functions over
  MAX_FUNCTION_LINES other than config literals."""
  found = []
  if source.count("\n") > MAX_MODULE_LINES:
    found.append(f"{name}: {source.count(chr(10))} lines")
  for node in ast.walk(ast.parse(source)):
    if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.name not in CONFIG_LITERALS):
      length = node.end_lineno - node.lineno + 1
      if length > MAX_FUNCTION_LINES:
        found.append(f"{name}:{node.lineno} {node.name}(): {length} lines")
  return found


def test_small_pieces():
  roots = [PACKAGE] + [os.path.join(helpers.REPO, d)
                       for d in ("workloads", "configs", "xprof", "benchmarks")]
  found = []
  for root in roots:
    for directory, _, files in os.walk(root):
      for name in sorted(f for f in files if f.endswith(".py")):
        path = os.path.join(directory, name)
        with open(path) as f:
          found += oversized(f.read(), os.path.relpath(path, helpers.REPO))
  assert not found, found


def test_the_size_check_sees_a_long_function_and_module():
  body = "\n".join(f"  x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
  long_function = f"def f():\n{body}\n"
  assert oversized(long_function, "m.py") == ["m.py:1 f(): 81 lines"]
  assert oversized(long_function.replace("def f", "def get_config"), "m.py") == []
  assert oversized("\n" * (MAX_MODULE_LINES + 1), "m.py") == ["m.py: 401 lines"]
