"""One trial's run directory: config.json, summary.json, metrics.jsonl,
grad_norms.jsonl (and log.txt). Missing files are listed in `Trial.problems`,
as are a JSON-lines log's unreadable lines (written while the trial trains,
or cut short by a kill): the log is read as every row that can be read, and
the line named. A damaged config.json or summary.json (each written whole)
raises json_records.RecordFileError, naming the file and the line.

  trial = trial_data.load_trial("D/trials/0003", "0003", params)
  steps, errors = trial.series("eval/validation/error_rate")
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Sequence

import numpy as np

from tuning_playbook.common import json_records
from tuning_playbook.common import records
from tuning_playbook.common import step_logs

RECORD_FILES = (records.CONFIG_FILE, records.METRICS_FILE,
                records.GRAD_NORMS_FILE, records.SUMMARY_FILE, records.LOG_FILE)
UNFINISHED = "unfinished"
_LISTED_LINES = 5


def finite(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _read_jsonl(path: str) -> tuple[list[dict[str, Any]], str | None]:
  """The step rows of a JSON-lines file, and what could not be read.

  Every readable row is used; unreadable lines are named in the problem, a
  torn last line (a write cut short) apart from the others.
  """
  name = os.path.basename(path)
  try:
    contents = step_logs.scan_jsonl(path)
  except OSError as e:
    return [], f"{name} unreadable ({e})"
  rows = [r for r in contents.rows if finite(r.get("step"))]
  problems = []
  if contents.bad_lines:
    numbers = [str(n) for n, _ in contents.bad_lines]
    first, excerpt = contents.bad_lines[0]
    listed = ", ".join(numbers[:_LISTED_LINES]) + (
        ", ..." if len(numbers) > _LISTED_LINES else "")
    problems.append(f"unreadable line{'s' if len(numbers) > 1 else ''} "
                    f"{listed} skipped (line {first}: {excerpt!r})")
  if contents.torn_line is not None:
    problems.append(f"unreadable line {contents.torn_line} dropped (a torn "
                    "last line: a write cut short)")
  return rows, (f"{name}: " + "; ".join(problems)) if problems else None


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
  params: dict[str, Any]  # The config overrides the sweep sampled.
  run_dir: str
  summary: dict[str, Any] | None
  config: dict[str, Any] | None
  metrics: list[dict[str, Any]]
  present_files: tuple[str, ...]
  problems: list[str]
  values: dict[str, Any] = dataclasses.field(default_factory=dict)  # By dimension.
  command: str = ""
  # records.trial_status of the run directory: the status results.csv and
  # the tracking table give the trial.
  record: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def status(self) -> str:
    """completed | diverged | failed | unfinished (pending, running or
    interrupted: not ended), as `records.trial_status` has it."""
    source = self.record or self.summary or {}
    status = source.get("status")
    return str(status) if status in records.ENDED_STATUSES else UNFINISHED

  @property
  def best_value(self) -> float | None:
    """The objective at the retrospectively selected best step."""
    value = (self.summary or {}).get("best_value")
    return float(value) if finite(value) else None

  @property
  def best_step(self) -> int | None:
    step = (self.summary or {}).get("best_step")
    return int(step) if finite(step) else None

  @property
  def max_train_steps(self) -> int | None:
    for source in (self.summary or {}, self.config or {}):
      if finite(source.get("max_train_steps")):
        return int(source["max_train_steps"])
    return None

  @property
  def total_train_steps(self) -> int | None:
    """The steps the run trains: max_train_steps plus a prepended warmup.

    From summary.json, else from config.json; a config without
    `optimizer.warmup_mode` predates prepended warmup (it counted warmup
    within max_train_steps).
    """
    total = (self.summary or {}).get("total_train_steps")
    if finite(total):
      return int(total)
    max_steps = self.max_train_steps
    optimizer = (self.config or {}).get("optimizer")
    if max_steps is None or not isinstance(optimizer, dict):
      return max_steps
    warmup = optimizer.get("warmup_steps")
    if optimizer.get("warmup_mode") == "prepended" and finite(warmup):
      return max_steps + int(warmup)
    return max_steps

  @property
  def final_step(self) -> int | None:
    step = (self.summary or {}).get("final_step")
    if finite(step):
      return int(step)
    return max((int(r["step"]) for r in self.metrics), default=None)

  @property
  def feasible(self) -> bool:
    return self.status == records.COMPLETED and self.best_value is not None

  @property
  def infeasible(self) -> bool:
    """Diverged, failed, or completed without a finite objective."""
    return self.status in records.INFEASIBLE_STATUSES or (
        self.status == records.COMPLETED and self.best_value is None)

  @property
  def reason(self) -> str:
    return str((self.record or self.summary or {}).get("reason") or "")

  @property
  def grad_clip_norm(self) -> float:
    value = (self.config or {}).get("grad_clip_norm", 0.0)
    return float(value) if finite(value) else 0.0

  def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a metric from metrics.jsonl."""
    return _series(self.metrics, key)

  @property
  def input_wait_fractions(self) -> np.ndarray:
    """Share of each log interval the loop waited for input (finite values)."""
    _, values = self.series("perf/input_wait_fraction")
    return values[np.isfinite(values)]

  @property
  def input_bound_threshold(self) -> float | None:
    """The run's `input_bound_warning_fraction`, if its config has one."""
    value = (self.config or {}).get("input_bound_warning_fraction")
    return float(value) if finite(value) else None

  @functools.cached_property
  def step_rows(self) -> list[dict[str, Any]]:
    """The rows of grad_norms.jsonl (one per step); [] when absent."""
    rows, problem = _read_jsonl(
        os.path.join(self.run_dir, records.GRAD_NORMS_FILE))
    if problem:
      self.problems.append(problem)
    return rows

  def step_series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) at step resolution from grad_norms.jsonl, falling
    back to the per-log-interval means in metrics.jsonl when it is absent."""
    if self.step_rows:
      return _series(self.step_rows, key)
    return self.series(key)

  @property
  def grad_norms(self) -> tuple[np.ndarray, np.ndarray]:
    """(steps, unclipped global gradient norm) at step resolution."""
    return self.step_series("train/grad_norm")

  @property
  def step_losses(self) -> tuple[np.ndarray, np.ndarray]:
    """(steps, training loss) of every step (or log interval)."""
    return self.step_series("train/loss")


def load_trial(run_dir: str, trial_id: str, params: dict[str, Any]) -> Trial:
  """Reads one trial's run directory, listing what is missing or unreadable."""
  problems = []
  present = tuple(f for f in RECORD_FILES
                  if os.path.exists(os.path.join(run_dir, f)))
  if not os.path.isdir(run_dir):
    problems.append("no run directory")
  summary = records.read_summary(run_dir)
  config = json_records.read_optional(os.path.join(run_dir, records.CONFIG_FILE))
  metrics, problem = _read_jsonl(os.path.join(run_dir, records.METRICS_FILE))
  problems += [problem] if problem else []
  if os.path.isdir(run_dir):
    missing = [f for f in RECORD_FILES[:4] if f not in present]
    if missing:
      problems.append("missing " + ", ".join(missing))
  return Trial(trial_id=trial_id, params=dict(params), run_dir=run_dir,
               summary=summary, config=config,
               metrics=metrics, present_files=present, problems=problems,
               record=(records.trial_status(run_dir) if os.path.isdir(run_dir)
                       else {}))
