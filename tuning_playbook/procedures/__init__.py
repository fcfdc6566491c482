"""Playbook procedures: studies that carry out one step of the tuning playbook.

  python -m tuning_playbook.playbook lr_sweep --config=configs/mnist1d_cnn.py \
      --study_dir=runs/cnn_lr_sweep --run --parallel=2

The registry is the module path: procedure `<name>` is the module
`tuning_playbook/procedures/<name>.py`, which exposes

  DESCRIPTION: str
      One line, shown where the procedures are listed.
  ARGUMENTS: tuple[Argument, ...]
      The procedure's own flags (`--<name>=...`), given to `plan` as a dict.
  NEEDS_FROM_STUDY: bool = False
      True when `--from_study` is required (the procedure starts from a
      finished study's best trials).
  plan(config, args, source) -> Plan
      `config` is the config as the user resolved it (every `--config.*`
      override applied, and the best trial of `--from_study` under them);
      `source` a `from_study.Source` or None. Returns the search space (grid
      "values" lists and "fixed" overrides, as tuning_playbook/studies/search_space.py
      reads it), the parameters recorded in study.json and, for a space
      that is not a grid, the number of trials. Raises
      ProcedureError naming the flag for bad input. A plan with a `sampler`
      runs batch by batch (`--batch`, the procedure's flag, or --parallel x
      --vectorize).
  stop_rule(record) -> bool   (optional)
      Trials then run one at a time in order, and none is launched after a
      trial whose tracking record (tuning_playbook/studies/tracking.py) satisfies it.
  analyze(study, save_figure) -> (findings, report_html.Section)
      `study` is the analysis' study_data.Study (its `procedure` holds the
      name and parameters); `save_figure(fig, name, caption)` stores a
      matplotlib figure in the report and returns its report_html.Image.
      Every finding's kind is the procedure's name.
  GENERAL_CHECKS_LEFT_OUT: Mapping[str, str] = {}   (optional)
      Kinds of the general analysis' findings that do not apply to the
      procedure's study, each with why (the report names them instead).

The analysis does not import this package: `report_hook(study)` hands the
report (tuning_playbook/analysis/report.py) `analyze` and
`GENERAL_CHECKS_LEFT_OUT` of the procedure that planned a study.

A study planned by a procedure is an ordinary study (study.json with a
`procedure` field, trials/, results.csv, a tracking-table row), so the sweep's
tools and `python -m tuning_playbook.analyze` work on it.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import types
from typing import Any, Mapping

from tuning_playbook.analysis import report
from tuning_playbook.analysis import study_data

PACKAGE = "tuning_playbook.procedures"
# Modules of this package that are helpers, not procedures.
_HELPERS = ("from_study", "bayes_designer")
ARGUMENT_KINDS = ("int", "float", "floats", "string", "bool")
SaveFigure = report.SaveFigure


class ProcedureError(ValueError):
  """Bad input to a procedure; the message names the flag or file."""


@dataclasses.dataclass(frozen=True)
class Argument:
  """One flag of a procedure: `--name`, of `kind` (see ARGUMENT_KINDS)."""
  name: str
  kind: str
  default: Any
  help: str


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a procedure runs: a search space, and what study.json records."""
  search_space: Mapping[str, Any]
  parameters: Mapping[str, Any]
  # Trials of a space that is not a grid (a grid has its own number).
  num_trials: int | None = None
  # An adaptive sampler (study.Sampler): trials are then proposed and run a
  # batch at a time, each batch knowing the results of the earlier ones.
  sampler: Any = None


def available() -> list[str]:
  """Names of the procedures shipped in this package."""
  package = importlib.import_module(PACKAGE)
  return sorted(m.name for m in pkgutil.iter_modules(package.__path__)
                if not m.name.startswith("_") and m.name not in _HELPERS)


def load(name: str) -> types.ModuleType:
  """The module of procedure `name`; ProcedureError listing the allowed ones."""
  allowed = available()
  if name not in allowed:
    raise ProcedureError(f"unknown procedure {name!r}; allowed: "
                         f"{', '.join(allowed)}")
  return importlib.import_module(f"{PACKAGE}.{name}")


def report_hook(study: study_data.Study) -> report.ProcedureHook | None:
  """The report's hook of the procedure that planned `study` (None for an
  ordinary study); one that cannot be loaded gives the error instead."""
  name = (study.procedure or {}).get("name")
  if not name:
    return None
  try:
    module = load(name)
  except ProcedureError as e:
    return report.ProcedureHook(name, error=str(e))
  return report.ProcedureHook(
      name, module.analyze,
      dict(getattr(module, "GENERAL_CHECKS_LEFT_OUT", {})))
