"""A trial's work directory: its files, its statuses and its records.

The one owner of what a trial directory holds: the file names (config.json,
metrics.jsonl, grad_norms.jsonl, summary.json, checkpoints/, and the runner's
runner.json, .lock and log.txt), the statuses, a trial's status as every
reader sees it (`trial_status`: results.csv, the report, the tracking table,
the runners), whether it needs a run, the summary builder and the one writer
of config.json. Only process 0 writes the records.

JSON files are replaced atomically (see atomic_files); the line-per-step logs
(metrics.jsonl, grad_norms.jsonl) are `step_logs.StepLog`s.
"""

from __future__ import annotations

import fcntl
import json
import os
from typing import Any

import ml_collections

from tuning_playbook.common import atomic_files
from tuning_playbook.common import json_records
from tuning_playbook import config_paths
from tuning_playbook import config_schema

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
GRAD_NORMS_FILE = "grad_norms.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
# Written by the runner that holds the trial (trial_lease).
RUNNER_FILE = "runner.json"
LOCK_FILE = ".lock"
LOG_FILE = "log.txt"
_TRAINER_OUTPUTS = (METRICS_FILE, GRAD_NORMS_FILE, CHECKPOINTS_DIR)
_REASON_CHARS = 300

# The statuses summary.json records: completed, diverged (the loss went
# non-finite or past its threshold) or failed (an unexpected error).
COMPLETED = "completed"
DIVERGED = "diverged"
FAILED = "failed"
# Finished: relaunching the run changes nothing.
FINISHED_STATUSES = (COMPLETED, DIVERGED)
# Ended: the run stopped by itself (a failed one may be retried).
ENDED_STATUSES = (COMPLETED, DIVERGED, FAILED)
# Infeasible: the trial gives no objective value.
INFEASIBLE_STATUSES = (DIVERGED, FAILED)
# A trial without an ended summary is pending (never started), running (a
# process holds its lock) or interrupted (started: relaunching resumes it).
PENDING = "pending"
RUNNING = "running"
INTERRUPTED = "interrupted"
# runner.json's statuses: running, interrupted (stopped to be resumed) or
# exited (with its return code; without a summary the trial failed).
EXITED = "exited"
RUNNER_STATUSES = (RUNNING, INTERRUPTED, EXITED)
# The summary's numbers every reader of a trial's status gets.
SUMMARY_NUMBERS = ("best_step", "best_metric", "best_value", "best_mode",
                   "final_step", "max_train_steps", "total_train_steps")

class ConfigMismatchError(ValueError):
  """The work directory holds a run of another config."""


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort(sort_keys=True))


# Config keys that may differ between the runs of one work directory.
RESHARDABLE_PREFIX = "sharding."


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """Lines `key: old -> new` for every field that differs (a key that `old`
  predates, at its default, does not; nor does the device mesh, which a run
  may change when it resumes: checkpoints restore onto any mesh)."""
  a, b = config_paths.flatten(old), config_paths.flatten(new)
  lines = []
  for key in sorted(set(a) | set(b)):
    if key.startswith(RESHARDABLE_PREFIX):
      continue
    if key not in a and config_schema.added_at_default(key, b[key]):
      continue
    if a.get(key, "<absent>") != b.get(key, "<absent>"):
      lines.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
  return lines


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json (the one format every reader of it expects)."""
  os.makedirs(workdir, exist_ok=True)
  atomic_files.write_json(os.path.join(workdir, CONFIG_FILE),
                          config_to_dict(config), sort_keys=True)


def check_or_write_config(workdir: str, config: ml_collections.ConfigDict,
                          write: bool) -> None:
  """Refuses a work directory that holds another config; writes config.json."""
  path = os.path.join(workdir, CONFIG_FILE)
  new = config_to_dict(config)
  old = json_records.read_optional(path)
  if old is not None:
    diff = config_differences(old, new)
    if diff:
      raise ConfigMismatchError(
          f"{workdir} holds a run with another config; nothing was changed. "
          "Use a new --workdir, or the same config. Differing fields:\n  "
          + "\n  ".join(diff))
    return
  if write:
    write_config(workdir, config)


def read_summary(workdir: str) -> dict[str, Any] | None:
  """summary.json, or None before the run ends (json_records' policy)."""
  return json_records.read_optional(os.path.join(workdir, SUMMARY_FILE))


def remove_unfinished_summary(workdir: str) -> None:
  """Drops a "failed" summary when the run starts again: it is not finished."""
  summary = read_summary(workdir)
  if summary is not None and summary.get("status") not in FINISHED_STATUSES:
    os.remove(os.path.join(workdir, SUMMARY_FILE))


def write_summary(workdir: str, summary: dict[str, Any]) -> None:
  atomic_files.write_json(os.path.join(workdir, SUMMARY_FILE), summary)


def summary(config: ml_collections.ConfigDict, status: str,
            reason: str | None, *, total_train_steps: int,
            best_step: int | None = None, best_value: float | None = None,
            final_step: int | None = None,
            best_checkpoint: str | None = None) -> dict[str, Any]:
  """summary.json's fields (a run may add more, such as `perf`)."""
  return {"status": status, "reason": reason, "best_step": best_step,
          "best_metric": config.best_metric, "best_mode": config.best_mode,
          "best_value": best_value, "final_step": final_step,
          "max_train_steps": config.max_train_steps,
          "total_train_steps": total_train_steps,
          "best_checkpoint": best_checkpoint}


def write_runner(trial_dir: str, status: str, **fields: Any) -> None:
  """Writes runner.json: the runner's `status` (RUNNER_STATUSES) and fields."""
  if status not in RUNNER_STATUSES:
    raise ValueError(f"runner status {status!r}: one of {RUNNER_STATUSES}")
  atomic_files.write_json(os.path.join(trial_dir, RUNNER_FILE),
                          {"status": status, **fields})


def is_locked(trial_dir: str) -> bool:
  """Whether a running process holds the trial's lock (see trial_lease)."""
  try:
    fd = os.open(os.path.join(trial_dir, LOCK_FILE), os.O_RDONLY)
  except OSError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return False
  except OSError:
    return True
  finally:
    os.close(fd)


def last_log_line(trial_dir: str) -> str:
  """The last non-empty line of the trial's log, usually the error."""
  try:
    with open(os.path.join(trial_dir, LOG_FILE), "rb") as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - 8192))
      lines = f.read().decode("utf-8", "replace").splitlines()
  except OSError:
    return ""
  for line in reversed(lines):
    if line.strip():
      return line.strip()[:_REASON_CHARS]
  return ""


def _exit_reason(returncode: int) -> str:
  if returncode < 0:
    return f"killed by signal {-returncode}"
  return f"exited with code {returncode}"


def trial_status(trial_dir: str, check_lock: bool = True) -> dict[str, Any]:
  """The trial's status, its reason and its summary's numbers.

  One answer for every reader. A summary with an ended status decides; else
  a runner that exited without one failed (the reason: its error, or its
  exit and the log's last line); else the trial is interrupted once started,
  pending before. `check_lock=False` is for the holder of the trial's lock,
  which would otherwise see its own trial as running.
  """
  record = {"status": PENDING, "reason": None,
            **dict.fromkeys(SUMMARY_NUMBERS)}
  if check_lock and is_locked(trial_dir):
    record["status"] = RUNNING
    return record
  ended = read_summary(trial_dir) or {}
  runner = json_records.read_optional(os.path.join(trial_dir, RUNNER_FILE)) or {}
  if ended.get("status") in ENDED_STATUSES:
    for key in record:
      if key in ended:
        record[key] = ended[key]
    if record["status"] == FAILED and not record["reason"]:
      record["reason"] = last_log_line(trial_dir) or FAILED
    return record
  if runner.get("status") == EXITED:
    code = runner.get("returncode")
    record["status"] = FAILED
    if runner.get("error"):
      record["reason"] = runner["error"]
    elif code == 0:
      record["reason"] = f"exited 0 without writing {SUMMARY_FILE}"
    else:
      last = last_log_line(trial_dir)
      record["reason"] = ((_exit_reason(code) if isinstance(code, int)
                           else "did not start") + (f": {last}" if last else ""))
    return record
  if runner or any(os.path.exists(os.path.join(trial_dir, name))
                   for name in _TRAINER_OUTPUTS):
    record["status"] = INTERRUPTED
  return record


def needs_run(trial_dir: str) -> bool:
  """Whether a runner should train the trial: it has not ended (a failed
  trial runs again once released, `trial_lease.release_failed`)."""
  return trial_status(trial_dir, check_lock=False)["status"] not in ENDED_STATUSES
