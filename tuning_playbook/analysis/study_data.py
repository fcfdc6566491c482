"""Reads a study directory: study.json, results.csv and each trial's records.

A study directory D holds `study.json` (name, config, search space, trials)
and one run directory per trial, `D/trials/<trial_id>/` (read by trial_data;
what is missing or torn is listed in `Trial.problems`, never raised). A
directory of studies, one per scientific value (`D/<param>=<value>/`), loads
as one study with the scientific hyperparameter as a categorical dimension.

  study = study_data.load_study("/tmp/studies/lr")
  for trial in study.feasible_trials():
    print(trial.trial_id, trial.best_value)
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from tuning_playbook.analysis import trial_data
from tuning_playbook.common import records
from tuning_playbook.studies import commands
from tuning_playbook.studies import dimension as dimension_lib
from tuning_playbook.studies import study as study_lib
from tuning_playbook.studies import tracking

STUDY_FILE = study_lib.STUDY_FILE
RESULTS_FILE = tracking.RESULTS_FILE
TRIALS_DIR = study_lib.TRIALS_DIR
NUMERIC_SCALES = dimension_lib.NUMERIC_SCALES  # The scales the sampler writes.
INT_SCALES = dimension_lib.INT_SCALES
INFEASIBLE_STATUSES = records.INFEASIBLE_STATUSES
UNFINISHED = trial_data.UNFINISHED
Trial = trial_data.Trial


class StudyError(ValueError):
  """The study directory cannot be analysed at all (no usable study.json)."""


@dataclasses.dataclass(frozen=True)
class Objective:
  """The metric that ranks trials, and whether lower or higher is better."""
  metric: str = "eval/validation/error_rate"
  mode: str = "min"

  def loss_like(self, values):
    """Maps values so that lower is better (NaN for missing ones)."""
    x = np.asarray(values, dtype=np.float64)
    return x if self.mode == "min" else -x

  @property
  def split_metric(self) -> tuple[str, str]:
    """("validation", "error_rate") for "eval/validation/error_rate"."""
    parts = self.metric.split("/")
    return (parts[1], parts[2]) if len(parts) == 3 else ("validation", parts[-1])

  def on_split(self, split: str) -> str:
    """The same metric evaluated on another split, e.g. "train" (of the
    same parameters: raw for eval/..., averaged for eval_ema/...)."""
    parts = self.metric.split("/")
    prefix = parts[0] if len(parts) == 3 else "eval"
    return f"{prefix}/{split}/{self.split_metric[1]}"


# One hyperparameter of the search space, as the sampler defines it.
Dimension = dimension_lib.Dimension


@dataclasses.dataclass
class Study:
  """A study: its search space, objective and trials.

  A directory holding one study per scientific value (the sweep's "separate"
  mode, `D/<param>=<value>/study.json`) loads as one study whose scientific
  hyperparameters are categorical dimensions, so they can be compared.
  """
  study_dir: str
  name: str
  description: str
  seed: Any
  config_path: str
  dimensions: dict[str, Dimension]
  trials: list[Trial]
  objective: Objective
  problems: list[str]
  fixed: dict[str, Any] = dataclasses.field(default_factory=dict)
  # {"name": ..., "parameters": {...}} of a study planned by a playbook
  # procedure (tuning_playbook/procedures); None for an ordinary sweep.
  procedure: dict[str, Any] | None = None

  def feasible_trials(self) -> list[Trial]:
    """Feasible trials, best first."""
    trials = [t for t in self.trials if t.feasible]
    return sorted(trials, key=lambda t: float(self.objective.loss_like(t.best_value)))

  def best_trial(self) -> Trial | None:
    feasible = self.feasible_trials()
    return feasible[0] if feasible else None

  def varied_dimensions(self) -> list[Dimension]:
    """Dimensions whose value differs between trials, in study.json order."""
    out = []
    for dim in self.dimensions.values():
      values = {json.dumps(t.values[dim.name], sort_keys=True, default=str)
                for t in self.trials if dim.name in t.values}
      if len(values) > 1 and dim.role != "fixed":
        out.append(dim)
    return out

  def scientific_dimensions(self) -> list[Dimension]:
    return [d for d in self.varied_dimensions() if d.role == "scientific"]


def _label(value: Any) -> Any:
  """A categorical value as shown: a dict of overrides becomes "k=v, k=v"."""
  if isinstance(value, dict):
    return ", ".join(f"{k}={v}" for k, v in value.items())
  return value


def _dimension(name: str, spec: Any) -> Dimension:
  dim = Dimension.from_json(name, spec)
  if dim.values is None:
    return dim
  return dataclasses.replace(dim, values=tuple(_label(v) for v in dim.values))


_ABSENT = object()


def dimension_values(dimensions: dict[str, Dimension], raw_values: Sequence[Any],
                     params: dict[str, Any]) -> dict[str, Any]:
  """The value of every dimension active in a trial, by dimension name."""
  out = {}
  for dim, raw in zip(dimensions.values(), raw_values):
    if any(out.get(parent, _ABSENT) != v for parent, v in dim.condition):
      continue
    if raw and all(isinstance(v, dict) for v in raw):
      match = next((v for v in raw if all(params.get(k, _ABSENT) == x
                                          for k, x in v.items())), None)
      if match is not None:
        out[dim.name] = _label(match)
    elif dim.param in params:
      out[dim.name] = params[dim.param]
  return out


def _objective(trials: Sequence[Trial], problems: list[str]) -> Objective:
  seen = []
  for trial in trials:
    for source in (trial.summary, trial.config):
      if source and source.get("best_metric"):
        seen.append(Objective(str(source["best_metric"]),
                              str(source.get("best_mode") or "min")))
        break
  if len(set(seen)) > 1:
    problems.append("trials disagree on the objective: " + ", ".join(
        sorted({f"{o.metric} ({o.mode})" for o in seen})))
  return seen[0] if seen else Objective()


def _results_commands(study_dir: str) -> dict[str, str]:
  """trial_id -> the reproduce command recorded in results.csv, if any."""
  path = os.path.join(study_dir, RESULTS_FILE)
  if not os.path.exists(path):
    return {}
  try:
    with open(path, newline="") as f:
      return {row.get("trial_id", ""): row.get("command") or ""
              for row in csv.DictReader(f)}
  except (OSError, csv.Error):
    return {}


def _command(spec: dict[str, Any], run_dir: str, params: dict[str, Any]) -> str:
  overrides = {**(spec.get("config_overrides") or {}), **(spec.get("fixed") or {}),
               **params}
  return commands.command_line(commands.module_argv(
      str(spec.get("trainer_module") or commands.DEFAULT_TRAINER),
      [f"--config={spec.get('config') or '<config>'}", f"--workdir={run_dir}"],
      overrides=overrides))


def _load_one(study_dir: str, spec: dict[str, Any], prefix: str = "") -> Study:
  problems = []
  search_space = spec.get("search_space") or {}
  dimensions = {name: _dimension(name, s) for name, s in search_space.items()}
  raw_values = [(s or {}).get("values") if isinstance(s, dict) else None
                for s in search_space.values()]
  commands = _results_commands(study_dir)
  trials = []
  for entry in spec.get("trials") or []:
    trial_id = str(entry.get("trial_id", len(trials)))
    params = entry.get("params") or {}
    run_dir = os.path.join(study_dir, TRIALS_DIR, trial_id)
    trial = trial_data.load_trial(run_dir, prefix + trial_id, params)
    trial.values = dimension_values(dimensions, raw_values, params)
    trial.command = commands.get(trial_id) or _command(spec, run_dir, params)
    trials.append(trial)
  listed = {t.trial_id[len(prefix):] for t in trials}
  trials_dir = os.path.join(study_dir, TRIALS_DIR)
  if os.path.isdir(trials_dir):
    extra = sorted(set(os.listdir(trials_dir)) - listed)
    if extra:
      problems.append(f"run directories not listed in {prefix or ''}study.json "
                      f"(ignored): " + ", ".join(extra))
  return Study(
      study_dir=study_dir, name=str(spec.get("name") or os.path.basename(
          os.path.normpath(study_dir))),
      description=str(spec.get("description") or ""), seed=spec.get("seed"),
      config_path=str(spec.get("config") or ""), dimensions=dimensions,
      trials=trials, objective=_objective(trials, problems), problems=problems,
      fixed=dict(spec.get("fixed") or {}),
      procedure=spec.get("procedure") if isinstance(spec.get("procedure"), dict)
      else None)


def _read_spec(study_dir: str) -> dict[str, Any] | None:
  """study.json's object, or None when there is no study.json."""
  try:
    return study_lib.read_study_json(study_dir)
  except study_lib.StudyError as e:
    raise StudyError(str(e)) from None


def _combine(study_dir: str, parts: Sequence[tuple[str, dict[str, Any], Study]]) -> Study:
  """One study from one study per scientific value."""
  dimensions: dict[str, Dimension] = {}
  for key in dict.fromkeys(k for _, spec, _ in parts for k in spec.get("scientific") or {}):
    values = [spec["scientific"][key] for _, spec, _ in parts
              if key in (spec.get("scientific") or {})]
    unique = {json.dumps(_label(v), default=str): _label(v) for v in values}
    dimensions[key] = Dimension(key, "categorical", values=tuple(unique.values()),
                                role="scientific")
  specs = collections.defaultdict(list)
  for _, _, part in parts:
    for name, dim in part.dimensions.items():
      specs[name].append(dim)
  # A name with different ranges per scientific value is a distinct dimension
  # per value (e.g. the learning rate of each optimizer).
  shared = {name for name, dims in specs.items() if all(d == dims[0] for d in dims)}
  trials, problems = [], []
  for slug, spec, part in parts:
    renamed = {}
    for name, dim in part.dimensions.items():
      if name in shared:
        dimensions.setdefault(name, dim)
      else:
        renamed[name] = f"{name}[{slug}]"
        dimensions[renamed[name]] = dataclasses.replace(dim, name=renamed[name])
    for trial in part.trials:
      trial.values = {renamed.get(k, k): v for k, v in trial.values.items()}
      trial.values.update({k: _label(v) for k, v in (spec.get("scientific") or {}).items()})
      trials.append(trial)
    problems += [f"{slug}: {p}" for p in part.problems]
  first = parts[0][2]
  return Study(
      study_dir=study_dir, name=first.name.split("/")[0] or os.path.basename(
          os.path.normpath(study_dir)),
      description=first.description, seed=first.seed, config_path=first.config_path,
      dimensions=dimensions, trials=trials, objective=_objective(trials, problems),
      problems=problems, fixed=first.fixed, procedure=first.procedure)


def load_study(study_dir: str) -> Study:
  """Reads study.json (or one per scientific value below) and every trial."""
  if not os.path.isdir(study_dir):
    raise StudyError(f"{study_dir} is not a directory: name a study directory "
                     f"(one holding {STUDY_FILE}, as tuning_playbook.sweep writes)")
  spec = _read_spec(study_dir)
  if spec is not None:
    return _load_one(study_dir, spec)
  parts = []
  for slug in sorted(os.listdir(study_dir)):
    sub = os.path.join(study_dir, slug)
    if os.path.isdir(sub) and os.path.exists(os.path.join(sub, STUDY_FILE)):
      sub_spec = _read_spec(sub)
      if sub_spec is not None:
        parts.append((slug, sub_spec, _load_one(sub, sub_spec, prefix=slug + "/")))
  if not parts:
    raise StudyError(f"no {STUDY_FILE} in {study_dir} or its subdirectories: "
                     "is it a study directory?")
  return _combine(study_dir, parts)
