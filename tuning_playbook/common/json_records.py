"""Optional JSON records: one reader, one error policy.

study.json, config.json, summary.json and runner.json are each replaced
whole (`atomic_files`), so a crash never leaves one half written: a record
that exists but cannot be read was damaged by hand or by the disk, and is
bad input. `read_optional` returns None when the file is absent and raises
`RecordFileError`, naming the file, the line and what is wrong, otherwise;
every entry point exits 2 with that message and changes nothing.

  summary = json_records.read_optional(os.path.join(workdir, "summary.json"))
"""

from __future__ import annotations

import json
from typing import Any


class RecordFileError(ValueError):
  """A record file that exists but cannot be read; its message names the
  file (and the line, where one is at fault)."""

  def __init__(self, path: str, problem: str, line: int | None = None):
    where = path if line is None else f"{path}, line {line}"
    super().__init__(f"{where}: {problem}")
    self.path = path
    self.line = line


def read_optional(path: str, written_by: str = "the framework") -> dict[str, Any] | None:
  """The JSON object in `path`, or None when there is no such file.

  `written_by` names the writer in the error (what the file must hold).
  Raises RecordFileError when the file cannot be read or holds no object.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    return None
  except OSError as e:
    raise RecordFileError(path, f"cannot be read ({e.strerror})") from None
  expected = f"it must hold the JSON object that {written_by} writes"
  try:
    record = json.loads(data.decode("utf-8"))
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise RecordFileError(path, f"not UTF-8 text ({e.reason}); {expected}",
                          line) from None
  except json.JSONDecodeError as e:
    raise RecordFileError(
        path, f"not readable as JSON ({e.msg}, column {e.colno}); {expected}",
        e.lineno) from None
  if not isinstance(record, dict):
    raise RecordFileError(
        path, f"holds a {type(record).__name__}, not a JSON object; {expected}")
  return record
