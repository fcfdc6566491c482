"""Experiment tracking: `results.csv` and the study table.

The playbook's spreadsheet, as two CSV files:

  D/results.csv        one row per trial: trial_id, status, reason, the
                       searched params, best step and metric, final step,
                       max_train_steps and total_train_steps (with a
                       prepended warmup), and the command that reproduces it.
  <tracking table>     one row per study: name, directory, config path,
                       description, number of trials, the best validation
                       value over its trials, the code that ran it
                       (code_version.py) and the sweep command.

  records = tracking.write_results(study)
  tracking.update_tracking_table("runs/studies.csv",
                                 tracking.study_row(study, records, command))

A trial's status and reason are `records.trial_status`: pending (never
started), running (a process holds the trial's lock), interrupted (started,
no summary: relaunching resumes it), completed, and the infeasible ones,
diverged and failed, each with its reason.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import fcntl
import json
import math
import os
from typing import Any, Iterator, Mapping, Sequence

from tuning_playbook.common import atomic_files
from tuning_playbook.common import records as records_lib
from tuning_playbook.studies import study as study_lib

RESULTS_FILE = "results.csv"
TRACKING_TABLE_FILE = "studies.csv"
RESULT_COLUMNS = ("trial_id", "status", "reason")
RESULT_METRIC_COLUMNS = ("best_step", "best_metric", "best_value",
                         "final_step", "max_train_steps", "total_train_steps",
                         "command")
TRACKING_COLUMNS = ("study", "study_dir", "config", "description",
                    "num_trials", "num_completed", "num_infeasible",
                    "num_unfinished", "best_trial", "best_metric",
                    "best_value", "updated", "code_version", "command")


def _param_columns(study: study_lib.Study) -> dict[str, str]:
  """Param name -> its results.csv column (prefixed only on a name clash)."""
  names = dict.fromkeys(n for trial in study.trials for n in trial.params)
  reserved = set(RESULT_COLUMNS) | set(RESULT_METRIC_COLUMNS)
  return {n: n if n not in reserved else f"param:{n}" for n in names}


def _write_csv(path: str, columns: Sequence[str],
               rows: Sequence[Mapping[str, Any]]) -> None:
  atomic_files.write_csv(path, columns,
                         ({c: _cell(row.get(c)) for c in columns} for row in rows))


def _cell(value: Any) -> Any:
  if value is None:
    return ""
  if isinstance(value, (dict, list, tuple)):
    return json.dumps(value)
  return value


def write_results(study: study_lib.Study) -> list[dict[str, Any]]:
  """Rewrites D/results.csv from the trial directories; returns the rows."""
  param_columns = _param_columns(study)
  rows = []
  for trial in study.trials:
    record = records_lib.trial_status(study.trial_dir(trial))
    row = {"trial_id": trial.trial_id, **record,
           "command": study.command_line(trial)}
    row.update({column: trial.params.get(name)
                for name, column in param_columns.items()})
    rows.append(row)
  columns = (list(RESULT_COLUMNS) + list(param_columns.values())
             + list(RESULT_METRIC_COLUMNS))
  _write_csv(os.path.join(study.study_dir, RESULTS_FILE), columns, rows)
  return rows


def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def study_row(study: study_lib.Study, records: Sequence[Mapping[str, Any]],
              command: str, code_version: str = "") -> dict[str, Any]:
  """The tracking-table row of a study, from its trial records;
  `code_version`: what ran it (`code_version.describe`)."""
  completed = [r for r in records if r["status"] == records_lib.COMPLETED]
  default_mode = study.base_config.get("best_mode", "min")
  best = None
  for r in completed:
    if not _is_number(r["best_value"]):
      continue
    sign = -1 if (r.get("best_mode") or default_mode) == "max" else 1
    if best is None or sign * r["best_value"] < sign * best["best_value"]:
      best = r
  return {
      "study": study.name,
      "study_dir": study.study_dir,
      "config": study.config_path,
      "description": study.description,
      "num_trials": len(records),
      "num_completed": len(completed),
      "num_infeasible": sum(r["status"] in records_lib.INFEASIBLE_STATUSES
                            for r in records),
      "num_unfinished": sum(r["status"] not in records_lib.ENDED_STATUSES
                            for r in records),
      "best_trial": best["trial_id"] if best else None,
      "best_metric": (best and best["best_metric"]) or study.base_config.get(
          "best_metric"),
      "best_value": best["best_value"] if best else None,
      "updated": datetime.datetime.now().isoformat(timespec="seconds"),
      "code_version": code_version,
      "command": command,
  }


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
  fd = os.open(f"{path}.lock", os.O_CREAT | os.O_RDWR, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)


def read_tracking_table(table_path: str) -> list[dict[str, str]]:
  """The table's rows, in the order studies were first recorded."""
  with open(table_path, newline="") as f:
    return list(csv.DictReader(f))


def update_tracking_table(table_path: str, row: Mapping[str, Any]) -> None:
  """Replaces the row of the same study directory, or appends one.

  Several sweeps may share one table: updates hold a lock on `<table>.lock`.
  """
  directory = os.path.dirname(os.path.abspath(table_path))
  os.makedirs(directory, exist_ok=True)
  key = os.path.abspath(row["study_dir"])
  with _file_lock(table_path):
    rows = read_tracking_table(table_path) if os.path.exists(table_path) else []
    for i, existing in enumerate(rows):
      if os.path.abspath(existing.get("study_dir", "")) == key:
        rows[i] = dict(row)
        break
    else:
      rows.append(dict(row))
    _write_csv(table_path, TRACKING_COLUMNS, rows)
