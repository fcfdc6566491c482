"""Reads a study directory: study.json, results.csv and each trial's records.

A study directory D holds `study.json` (name, config, search space, trials)
and one run directory per trial, `D/trials/<trial_id>/`. Missing or torn
files never raise: the trial is kept, with what is missing listed in
`Trial.problems`.

  study = study_data.load_study("/tmp/studies/lr")
  for trial in study.feasible_trials():
    print(trial.trial_id, trial.best_value)
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
import shlex
from typing import Any, Sequence

import numpy as np

STUDY_FILE = "study.json"
RESULTS_FILE = "results.csv"
TRIALS_DIR = "trials"
RECORD_FILES = ("config.json", "metrics.jsonl", "grad_norms.jsonl",
                "summary.json", "log.txt")
NUMERIC_SCALES = ("linear", "log", "reverse_log", "int", "int_log")
LOG_SCALES = ("log", "int_log")
INFEASIBLE_STATUSES = ("diverged", "failed")
UNFINISHED = "unfinished"


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
    """The same metric evaluated on another split, e.g. "train"."""
    return f"eval/{split}/{self.split_metric[1]}"


@dataclasses.dataclass(frozen=True)
class Dimension:
  """One hyperparameter of the search space."""
  name: str
  scale: str
  min: float | None = None
  max: float | None = None
  values: tuple[Any, ...] | None = None
  role: str = "nuisance"

  @property
  def numeric(self) -> bool:
    return self.scale in NUMERIC_SCALES

  def position(self, value: Any) -> float | None:
    """Where `value` lies in [min, max], in [0, 1] along the dimension's scale."""
    if not self.numeric or value is None or self.min is None or self.max is None:
      return None
    try:
      v, lo, hi = float(value), float(self.min), float(self.max)
      if self.scale in LOG_SCALES:
        v, lo, hi = math.log(v), math.log(lo), math.log(hi)
      elif self.scale == "reverse_log":
        v, lo, hi = -math.log(1 - v), -math.log(1 - lo), -math.log(1 - hi)
    except (TypeError, ValueError):
      return None
    if hi == lo:
      return 0.5
    return (v - lo) / (hi - lo)

  def value_at(self, position: float) -> float:
    """The inverse of `position` (a float, not rounded for int scales)."""
    lo, hi = float(self.min), float(self.max)
    if self.scale in LOG_SCALES:
      return math.exp(math.log(lo) + position * (math.log(hi) - math.log(lo)))
    if self.scale == "reverse_log":
      a, b = -math.log(1 - lo), -math.log(1 - hi)
      return 1 - math.exp(-(a + position * (b - a)))
    return lo + position * (hi - lo)


def _finite(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _read_json(path: str) -> tuple[Any, str | None]:
  if not os.path.exists(path):
    return None, None
  try:
    with open(path) as f:
      return json.load(f), None
  except (OSError, ValueError) as e:
    return None, f"{os.path.basename(path)} unreadable ({e})"


def _read_jsonl(path: str) -> tuple[list[dict[str, Any]], str | None]:
  """Rows of a JSON-lines file; stops at the first torn or bad line."""
  if not os.path.exists(path):
    return [], None
  rows = []
  try:
    with open(path) as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except ValueError:
          return rows, f"{os.path.basename(path)}: unreadable line {n}, rest ignored"
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
          rows.append(row)
  except OSError as e:
    return rows, f"{os.path.basename(path)} unreadable ({e})"
  return rows, None


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of the rows holding `key`, sorted by step; NaN kept."""
  pairs = {}
  for row in rows:
    if key in row:
      value = row[key]
      numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
      pairs[int(row["step"])] = float(value) if numeric else math.nan
  steps = np.array(sorted(pairs), dtype=np.int64)
  return steps, np.array([pairs[s] for s in steps], dtype=np.float64)


@dataclasses.dataclass
class Trial:
  """One trial: its sampled hyperparameters and what its run directory holds."""
  trial_id: str
  params: dict[str, Any]
  run_dir: str
  summary: dict[str, Any] | None
  config: dict[str, Any] | None
  metrics: list[dict[str, Any]]
  present_files: tuple[str, ...]
  problems: list[str]

  @property
  def status(self) -> str:
    """completed | diverged | failed | unfinished (no summary.json)."""
    if not self.summary:
      return UNFINISHED
    return str(self.summary.get("status", UNFINISHED))

  @property
  def best_value(self) -> float | None:
    """The objective at the retrospectively selected best step."""
    value = (self.summary or {}).get("best_value")
    return float(value) if _finite(value) else None

  @property
  def best_step(self) -> int | None:
    step = (self.summary or {}).get("best_step")
    return int(step) if _finite(step) else None

  @property
  def max_train_steps(self) -> int | None:
    for source in (self.summary or {}, self.config or {}):
      if _finite(source.get("max_train_steps")):
        return int(source["max_train_steps"])
    return None

  @property
  def final_step(self) -> int | None:
    step = (self.summary or {}).get("final_step")
    if _finite(step):
      return int(step)
    return max((int(r["step"]) for r in self.metrics), default=None)

  @property
  def feasible(self) -> bool:
    return self.status == "completed" and self.best_value is not None

  @property
  def infeasible(self) -> bool:
    """Diverged, failed, or completed without a finite objective."""
    return self.status in INFEASIBLE_STATUSES or (
        self.status == "completed" and self.best_value is None)

  @property
  def reason(self) -> str:
    return str((self.summary or {}).get("reason") or "")

  @property
  def grad_clip_norm(self) -> float:
    value = (self.config or {}).get("grad_clip_norm", 0.0)
    return float(value) if _finite(value) else 0.0

  def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a metric from metrics.jsonl."""
    return _series(self.metrics, key)

  @functools.cached_property
  def grad_norms(self) -> tuple[np.ndarray, np.ndarray]:
    """(steps, unclipped global gradient norm) at step resolution.

    Falls back to the per-log-interval means in metrics.jsonl when
    grad_norms.jsonl is absent.
    """
    rows, problem = _read_jsonl(os.path.join(self.run_dir, "grad_norms.jsonl"))
    if problem:
      self.problems.append(problem)
    if rows:
      return _series(rows, "train/grad_norm")
    return self.series("train/grad_norm")


@dataclasses.dataclass
class Study:
  """A study: its search space, objective and trials."""
  study_dir: str
  name: str
  description: str
  seed: Any
  config_path: str
  dimensions: dict[str, Dimension]
  trials: list[Trial]
  objective: Objective
  results_rows: dict[str, dict[str, str]]
  problems: list[str]

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
      values = {json.dumps(t.params.get(dim.name), sort_keys=True)
                for t in self.trials if dim.name in t.params}
      if len(values) > 1 and dim.role != "fixed":
        out.append(dim)
    return out

  def scientific_dimensions(self) -> list[Dimension]:
    return [d for d in self.varied_dimensions() if d.role == "scientific"]

  def reproduce_command(self, trial: Trial) -> str:
    """The command that reruns `trial`: results.csv's if it has one."""
    row = self.results_rows.get(trial.trial_id, {})
    for key, value in row.items():
      if key and "command" in key.lower() and value:
        return value
    args = ["python", "-m", "tuning_playbook.main", f"--config={self.config_path}",
            f"--workdir={trial.run_dir}"]
    for name, value in trial.params.items():
      args.append(f"--config.{name}={_flag_value(value)}")
    return " ".join(shlex.quote(a) for a in args)


def _flag_value(value: Any) -> str:
  if isinstance(value, float):
    return repr(value)
  return str(value)


def _dimension(name: str, spec: Any) -> Dimension:
  spec = spec if isinstance(spec, dict) else {}
  values = spec.get("values")
  return Dimension(
      name=name, scale=str(spec.get("scale", "categorical" if values else "linear")),
      min=spec.get("min"), max=spec.get("max"),
      values=tuple(values) if isinstance(values, list) else None,
      role=str(spec.get("role", "nuisance")))


def load_trial(run_dir: str, trial_id: str, params: dict[str, Any]) -> Trial:
  """Reads one trial's run directory, listing what is missing or unreadable."""
  problems = []
  present = tuple(f for f in RECORD_FILES
                  if os.path.exists(os.path.join(run_dir, f)))
  if not os.path.isdir(run_dir):
    problems.append("no run directory")
  summary, problem = _read_json(os.path.join(run_dir, "summary.json"))
  problems += [problem] if problem else []
  config, problem = _read_json(os.path.join(run_dir, "config.json"))
  problems += [problem] if problem else []
  metrics, problem = _read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
  problems += [problem] if problem else []
  if os.path.isdir(run_dir):
    missing = [f for f in RECORD_FILES[:4] if f not in present]
    if missing:
      problems.append("missing " + ", ".join(missing))
  return Trial(trial_id=trial_id, params=dict(params), run_dir=run_dir,
               summary=summary if isinstance(summary, dict) else None,
               config=config if isinstance(config, dict) else None,
               metrics=metrics, present_files=present, problems=problems)


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


def _results_rows(study_dir: str) -> dict[str, dict[str, str]]:
  path = os.path.join(study_dir, RESULTS_FILE)
  if not os.path.exists(path):
    return {}
  try:
    with open(path, newline="") as f:
      return {row.get("trial_id", ""): row for row in csv.DictReader(f)}
  except (OSError, csv.Error):
    return {}


def load_study(study_dir: str) -> Study:
  """Reads study.json and every trial it lists."""
  path = os.path.join(study_dir, STUDY_FILE)
  spec, problem = _read_json(path)
  if problem or not isinstance(spec, dict):
    raise StudyError(problem or f"{path} not found: is {study_dir} a study directory?")
  problems = []
  dimensions = {name: _dimension(name, s)
                for name, s in (spec.get("search_space") or {}).items()}
  trials = []
  for entry in spec.get("trials") or []:
    trial_id = str(entry.get("trial_id", len(trials)))
    trials.append(load_trial(os.path.join(study_dir, TRIALS_DIR, trial_id),
                             trial_id, entry.get("params") or {}))
  listed = {t.trial_id for t in trials}
  trials_dir = os.path.join(study_dir, TRIALS_DIR)
  if os.path.isdir(trials_dir):
    extra = sorted(set(os.listdir(trials_dir)) - listed)
    if extra:
      problems.append("run directories not listed in study.json (ignored): "
                      + ", ".join(extra))
  return Study(
      study_dir=study_dir, name=str(spec.get("name") or os.path.basename(
          os.path.normpath(study_dir))),
      description=str(spec.get("description") or ""), seed=spec.get("seed"),
      config_path=str(spec.get("config") or ""), dimensions=dimensions,
      trials=trials, objective=_objective(trials, problems),
      results_rows=_results_rows(study_dir), problems=problems)
