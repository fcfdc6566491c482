"""A trial's work directory: its files, its statuses and its records.

The one owner of what a trial directory holds: the file names (config.json,
metrics.jsonl, grad_norms.jsonl, summary.json, checkpoints/, and the runner's
runner.json, .lock and log.txt), the statuses, a trial's status as every
reader sees it (`trial_status`: results.csv, the report, the tracking table,
the runners), whether it needs a run, the summary builder and the one writer
of config.json. Only process 0 writes the records.

JSON files are replaced atomically (see atomic_files). The line-per-step logs
are appended, and on resume cut back to the restored step, so each step
appears once. A readable row is never dropped: only a torn last line (a write
cut short by a kill) is discarded, and an unreadable line anywhere else stops
the reader with a `RecordsError` naming the file and the line.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
from typing import Any, Iterable

import ml_collections

from tuning_playbook import atomic_files
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

_EXCERPT_CHARS = 80


class ConfigMismatchError(ValueError):
  """The work directory holds a run of another config."""


class RecordsError(ValueError):
  """A JSON-lines file holds an unreadable line that is not its last."""

  def __init__(self, path: str, line_number: int, excerpt: str):
    super().__init__(
        f"{path}, line {line_number}: unreadable (not a JSON object): "
        f"{excerpt!r}. Only a torn last line may be dropped, so the file was "
        "left as it is; repair or remove that line by hand.")
    self.path = path
    self.line_number = line_number
    self.excerpt = excerpt


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
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    diff = config_differences(old, new)
    if diff:
      raise ConfigMismatchError(
          f"{workdir} holds a run with another config; nothing was changed. "
          "Use a new --workdir, or the same config. Differing fields:\n  "
          + "\n  ".join(diff))
    return
  if write:
    write_config(workdir, config)


@dataclasses.dataclass(frozen=True)
class _Line:
  number: int  # 1-based.
  start: int  # Byte offset in the file.
  text: bytes  # Without its newline.
  row: dict[str, Any] | None  # None: unreadable.


def _parse(text: bytes) -> dict[str, Any] | None:
  try:
    row = json.loads(text.decode("utf-8"))
  except ValueError:  # Also UnicodeDecodeError.
    return None
  return row if isinstance(row, dict) else None


def _lines(data: bytes) -> list[_Line]:
  """The non-blank lines of a JSON-lines file, parsed."""
  lines, start = [], 0
  for number, text in enumerate(data.split(b"\n"), 1):
    if text.strip():
      lines.append(_Line(number, start, text, _parse(text)))
    start += len(text) + 1
  return lines


def _is_torn(lines: list[_Line], i: int) -> bool:
  """An unreadable last line is a write cut short; nothing follows it."""
  return i == len(lines) - 1 and lines[i].row is None


def _excerpt(text: bytes) -> str:
  s = text.decode("utf-8", "replace")
  return s if len(s) <= _EXCERPT_CHARS else s[:_EXCERPT_CHARS] + "..."


@dataclasses.dataclass(frozen=True)
class JsonlContents:
  """What a JSON-lines file holds.

  `rows`: every readable row, in file order. `bad_lines`: (line number,
  excerpt) of each unreadable line other than a torn last one. `torn_line`:
  the number of a torn last line (not in `rows`), or None.
  """
  rows: list[dict[str, Any]]
  bad_lines: list[tuple[int, str]]
  torn_line: int | None


def _read_lines(path: str) -> tuple[bytes, list[_Line]]:
  if not os.path.exists(path):
    return b"", []
  with open(path, "rb") as f:
    data = f.read()
  return data, _lines(data)


def scan_jsonl(path: str) -> JsonlContents:
  """Every readable row of a JSON-lines file and its unreadable lines.

  For readers that report damage rather than stop at it (the analysis).
  """
  _, lines = _read_lines(path)
  torn = bool(lines) and _is_torn(lines, len(lines) - 1)
  return JsonlContents(
      rows=[line.row for line in lines if line.row is not None],
      bad_lines=[(line.number, _excerpt(line.text))
                 for i, line in enumerate(lines)
                 if line.row is None and not _is_torn(lines, i)],
      torn_line=lines[-1].number if torn else None)


def _readable_lines(path: str) -> tuple[bytes, list[_Line]]:
  """The file's bytes and readable lines; raises RecordsError at a bad one."""
  data, lines = _read_lines(path)
  for i, line in enumerate(lines):
    if line.row is None and not _is_torn(lines, i):
      raise RecordsError(path, line.number, _excerpt(line.text))
  return data, [line for line in lines if line.row is not None]


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """The rows of a JSON-lines file ([] if absent), without a torn last line.

  Raises RecordsError for an unreadable line anywhere else.
  """
  return [line.row for line in _readable_lines(path)[1]]


class StepLog:
  """A JSON-lines file with one object per step, appended at log time.

    log = StepLog("workdir/metrics.jsonl", enabled=jax.process_index() == 0)
    log.truncate_after(restored_step)
    log.append([{"step": 100, "train/loss": 0.25}])
  """

  def __init__(self, path: str, enabled: bool):
    self.path = path
    self.enabled = enabled
    self._tail_checked = False

  def truncate_after(self, step: int) -> None:
    """Drops the rows of steps after `step`, and a torn last line.

    Raises RecordsError, changing nothing, if a line other than the last is
    unreadable: rewriting would lose the rows after it.
    """
    if not self.enabled or not os.path.exists(self.path):
      return
    data, lines = _readable_lines(self.path)
    kept = b"".join(line.text + b"\n" for line in lines
                    if not _after(line.row, step))
    if kept != data:
      atomic_files.write_bytes(self.path, kept)
    self._tail_checked = True

  def append(self, rows: Iterable[dict[str, Any]]) -> None:
    if not self.enabled:
      return
    text = "".join(_dumps(r) + "\n" for r in rows)
    if not text:
      return
    if not self._tail_checked:
      text = self._mend_tail() + text
      self._tail_checked = True
    with open(self.path, "a") as f:
      f.write(text)
      f.flush()

  def _mend_tail(self) -> str:
    """Cuts off a torn last line; returns the newline a whole one lacks."""
    data, lines = _read_lines(self.path)
    if lines and lines[-1].row is None:
      os.truncate(self.path, lines[-1].start)
      return ""
    return "\n" if data and not data.endswith(b"\n") else ""


def _after(row: dict[str, Any], step: int) -> bool:
  value = row.get("step")
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and value > step)


def _dumps(row: dict[str, Any]) -> str:
  return json.dumps({k: (float(v) if not isinstance(v, (int, str)) else v)
                     for k, v in row.items()})


def read_summary(workdir: str) -> dict[str, Any] | None:
  path = os.path.join(workdir, SUMMARY_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


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


def _read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


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
  ended = _read_json(os.path.join(trial_dir, SUMMARY_FILE))
  runner = _read_json(os.path.join(trial_dir, RUNNER_FILE)) or {}
  if isinstance(ended, dict) and ended.get("status") in ENDED_STATUSES:
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


def needs_run(trial_dir: str, retry_failed: bool) -> bool:
  """Whether a runner should train the trial: it has not finished (a failed
  one only with `retry_failed`)."""
  status = trial_status(trial_dir, check_lock=False)["status"]
  return not (status in FINISHED_STATUSES
              or (status == FAILED and not retry_failed))
