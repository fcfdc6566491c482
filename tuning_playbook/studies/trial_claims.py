"""Claims on trials that hold across machines sharing a study directory.

  claim = trial_claims.try_claim(trial_dir)
  if claim is not None:
    ...  # Run the trial, calling claim.refresh() every few seconds.
    claim.release()

A claim is the file `<trial_dir>/.claim`, created with O_CREAT | O_EXCL, which
is atomic on local file systems and on NFS (v3 and later): of several workers,
on any machines, exactly one creates it. It holds the owner's host, pid and a
random token. `flock` alone is not enough on a shared file system (NFS clients
may implement it per machine, or not at all).

A claim is stale, and the next worker takes the trial over, when
- its owner ran on this host and that process is gone (or a zombie), or
- its heartbeat (the file's modification time, refreshed by the owner every
  `HEARTBEAT_SECONDS`) is older than `STALE_SECONDS`, whatever the host: a
  worker on another machine that died, or lost the file system, that long ago.
Breaking a stale claim holds `<trial_dir>/.claim.break` (also O_EXCL), so two
workers never both remove a claim and one of them the other's new one.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import socket
import time
import uuid

from tuning_playbook.common import json_records

CLAIM_FILE = ".claim"
_BREAK_FILE = ".claim.break"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 600.0
# A break file outlives its holder only if that worker died mid-break.
_STALE_BREAK_SECONDS = 60.0


@dataclasses.dataclass
class Claim:
  """This process's claim on one trial directory."""
  trial_dir: str
  token: str
  refreshed: float = 0.0

  @property
  def path(self) -> str:
    return os.path.join(self.trial_dir, CLAIM_FILE)

  def refresh(self, now: float | None = None) -> None:
    """Renews the heartbeat if `HEARTBEAT_SECONDS` have passed since the last."""
    now = time.monotonic() if now is None else now
    if now - self.refreshed >= HEARTBEAT_SECONDS:
      try:
        os.utime(self.path)
      except OSError:
        pass  # Broken as stale meanwhile: the trial's own lock still guards it.
      self.refreshed = now

  def release(self) -> None:
    """Removes the claim if it is still this one."""
    if (read_claim(self.trial_dir) or {}).get("token") == self.token:
      _remove(self.path)


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


def _create_exclusive(path: str, content: dict) -> bool:
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    json.dump(content, f)
    f.flush()
    os.fsync(f.fileno())
  return True


def read_claim(trial_dir: str) -> dict | None:
  """The claim's owner record ({host, pid, token, claimed}), or None: no
  claim, or one still being written (created empty, then filled; its age
  judges it, `is_stale`)."""
  try:
    return json_records.read_optional(os.path.join(trial_dir, CLAIM_FILE))
  except json_records.RecordFileError:
    return None


def _pid_alive(pid: int) -> bool:
  """Whether process `pid` of this host still runs (a zombie does not: a
  killed worker whose parent died stays one until PID 1 reaps it, which in a
  container may take seconds)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  try:
    with open(f"/proc/{pid}/stat") as f:
      # "pid (comm) state ...": comm may hold spaces and parentheses.
      state = f.read().rpartition(")")[2].split()[0]
  except (OSError, IndexError):
    return True  # No procfs (macOS): the signal check above is all there is.
  return state not in ("Z", "X")


def _age(path: str) -> float | None:
  try:
    return time.time() - os.stat(path).st_mtime
  except FileNotFoundError:
    return None


def is_stale(trial_dir: str) -> bool:
  """Whether an existing claim on `trial_dir` may be taken over (see above)."""
  age = _age(os.path.join(trial_dir, CLAIM_FILE))
  if age is None:
    return False
  if age > STALE_SECONDS:
    return True
  owner = read_claim(trial_dir)
  if owner is None:  # Being written (or torn by a crash): judged by age alone.
    return False
  return (owner.get("host") == socket.gethostname()
          and not _pid_alive(int(owner.get("pid", 0))))


def _break_if_stale(trial_dir: str) -> None:
  breaker = os.path.join(trial_dir, _BREAK_FILE)
  age = _age(breaker)
  if age is not None and age > _STALE_BREAK_SECONDS:
    _remove(breaker)
  if not _create_exclusive(breaker, {"host": socket.gethostname(),
                                     "pid": os.getpid()}):
    return
  try:
    if is_stale(trial_dir):  # Checked again: nobody else can break it now.
      _remove(os.path.join(trial_dir, CLAIM_FILE))
  finally:
    _remove(breaker)


def try_claim(trial_dir: str) -> Claim | None:
  """Claims `trial_dir` for this process, or None if a live owner holds it."""
  os.makedirs(trial_dir, exist_ok=True)
  token = uuid.uuid4().hex
  content = {"host": socket.gethostname(), "pid": os.getpid(), "token": token,
             "claimed": datetime.datetime.now().isoformat(timespec="seconds")}
  path = os.path.join(trial_dir, CLAIM_FILE)
  for _ in range(2):
    if _create_exclusive(path, content):
      return Claim(trial_dir, token, refreshed=time.monotonic())
    _break_if_stale(trial_dir)
  return None
