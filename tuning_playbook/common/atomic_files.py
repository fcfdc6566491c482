"""Whole-file writes that readers never see half done.

Every JSON and CSV file of a run or a study is written here: to a temporary
file in the same directory (a unique name, so concurrent writers never share
one), flushed and fsynced, then renamed over the target. A reader sees the old
file or the new one; a failed write leaves the old file and no temporary one.

  atomic_files.write_json("runs/lr/study.json", {"name": "lr", "trials": []})
  atomic_files.write_csv("runs/lr/results.csv", ["trial_id", "status"],
                         [{"trial_id": "0000", "status": "completed"}])
  with atomic_files.replacing("report/plot.png", "wb") as f:
    fig.savefig(f, format="png")
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import uuid
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, Sequence


@contextlib.contextmanager
def replacing(path: str, mode: str = "w", newline: str | None = None
              ) -> Iterator[IO[Any]]:
  """Yields a file that replaces `path` when the block ends without error."""
  if mode not in ("w", "wb"):
    raise ValueError(f"mode={mode!r}: must be 'w' or 'wb'")
  directory, name = os.path.split(os.path.abspath(path))
  tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
  # O_EXCL: a name some other writer holds is never reused; 0o666 less the
  # umask gives the permissions a plain open() would.
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, mode, newline=newline) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
  """Makes the rename itself durable, where the platform allows it."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_text(path: str, text: str) -> None:
  """Replaces `path` with `text`."""
  with replacing(path) as f:
    f.write(text)


def write_bytes(path: str, data: bytes) -> None:
  """Replaces `path` with `data`."""
  with replacing(path, "wb") as f:
    f.write(data)


def write_json(path: str, obj: Any, *, sort_keys: bool = False,
               default: Callable[[Any], Any] | None = None,
               allow_nan: bool = True) -> None:
  """Replaces `path` with `obj` as indented JSON and a final newline."""
  with replacing(path) as f:
    json.dump(obj, f, indent=2, sort_keys=sort_keys, default=default,
              allow_nan=allow_nan)
    f.write("\n")


def write_csv(path: str, columns: Sequence[str],
              rows: Iterable[Mapping[str, Any]]) -> None:
  """Replaces `path` with a header of `columns` and one line per row.

  A column missing from a row is left empty; a key not in `columns` raises.
  """
  with replacing(path, newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(columns), restval="")
    writer.writeheader()
    writer.writerows(rows)
