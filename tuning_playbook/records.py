"""The run's records in its work directory: config.json, metrics.jsonl,
grad_norms.jsonl and summary.json. Only process 0 writes them.

Files are replaced atomically (write to a temporary file, then rename), and on
resume the line-per-step logs are cut back to the restored step, so each step
appears once.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

import ml_collections

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
GRAD_NORMS_FILE = "grad_norms.jsonl"
SUMMARY_FILE = "summary.json"
# A run with one of these statuses is done: relaunching it changes nothing.
FINISHED_STATUSES = ("completed", "diverged")


class ConfigMismatchError(ValueError):
  """The work directory holds a run of another config."""


def atomic_write_text(path: str, text: str) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in d.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """Lines `key: old -> new` for every field that differs."""
  a, b = _flatten(old), _flatten(new)
  lines = []
  for key in sorted(set(a) | set(b)):
    if a.get(key, "<absent>") != b.get(key, "<absent>"):
      lines.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
  return lines


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
    os.makedirs(workdir, exist_ok=True)
    atomic_write_text(path, json.dumps(new, indent=2, sort_keys=True) + "\n")


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """Reads a JSON-lines file, ignoring a torn last line."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        break
  return rows


class StepLog:
  """A JSON-lines file with one object per step, appended at log time."""

  def __init__(self, path: str, enabled: bool):
    self.path = path
    self.enabled = enabled

  def truncate_after(self, step: int) -> None:
    """Drops every row after `step` (and a torn last line)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    rows = [r for r in read_jsonl(self.path) if r["step"] <= step]
    atomic_write_text(self.path, "".join(_dumps(r) + "\n" for r in rows))

  def append(self, rows: Iterable[dict[str, Any]]) -> None:
    if not self.enabled:
      return
    text = "".join(_dumps(r) + "\n" for r in rows)
    if text:
      with open(self.path, "a") as f:
        f.write(text)
        f.flush()


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
  atomic_write_text(os.path.join(workdir, SUMMARY_FILE),
                    json.dumps(summary, indent=2) + "\n")

