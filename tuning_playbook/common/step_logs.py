"""JSON-lines logs with one object per step (metrics.jsonl, grad_norms.jsonl).

They are appended at log time, and on resume cut back to the restored step,
so each step appears once. A readable row is never dropped: only a torn last
line (a write cut short by a kill) is discarded, and an unreadable line
anywhere else stops the reader with a `RecordsError` naming the file and the
line.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable

from tuning_playbook.common import atomic_files
from tuning_playbook.common import json_records

_EXCERPT_CHARS = 80


class RecordsError(json_records.RecordFileError):
  """A JSON-lines file holds an unreadable line that is not its last."""

  def __init__(self, path: str, line_number: int, excerpt: str):
    super().__init__(
        path, f"unreadable (not a JSON object): {excerpt!r}. Only a torn last "
        "line may be dropped, so the file was left as it is; repair or remove "
        "that line by hand.", line_number)
    self.line_number = line_number
    self.excerpt = excerpt


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
