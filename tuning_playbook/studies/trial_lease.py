"""A runner's hold on one trial: its claim, its lock and its runner.json.

  lease = trial_lease.acquire(trial_dir)
  if lease is not None:
    lease.start(argv)
    lease.running(pid)         # runner.json: running, with the pid
    ...                        # lease.refresh() every few seconds
    lease.end(returncode)      # runner.json: exited (or interrupted)
    lease.release()

Every runner (the process-per-trial runner, a study worker's population)
takes a trial through `acquire`: the claim first (`trial_claims`: an O_EXCL
file with a heartbeat, safe across machines), then the trial's exclusive
lock (`flock` on `.lock`, held for as long as the trial's process lives),
then its status checked again (finished by whoever held it meanwhile). So
two runners, here or on machines sharing the study directory, never train
one trial; a stale claim (its owner gone) is taken over.

A launch asked to run failed trials again (`--retry_failed`) first
`release_failed`s them, once, under the same lease: each reads as
interrupted (runner.json keeps the failure) and every runner then trains
it as any unfinished trial, so a trial that fails again in that launch is
not retried over and over.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import os
from typing import Any, Sequence

from tuning_playbook.common import json_records
from tuning_playbook.common import records
from tuning_playbook.common import termination
from tuning_playbook.studies import trial_claims


def now() -> str:
  return datetime.datetime.now().isoformat(timespec="seconds")


def try_lock(trial_dir: str) -> int | None:
  """An fd holding the trial's exclusive lock, or None if someone holds it."""
  os.makedirs(trial_dir, exist_ok=True)
  fd = os.open(os.path.join(trial_dir, records.LOCK_FILE),
               os.O_CREAT | os.O_RDWR, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd
  except OSError:
    os.close(fd)
    return None


def held_elsewhere(trial_dir: str) -> bool:
  """Whether a live runner claimed the trial or a process holds its lock."""
  return ((trial_claims.read_claim(trial_dir) is not None
           and not trial_claims.is_stale(trial_dir))
          or records.is_locked(trial_dir))


@dataclasses.dataclass
class Lease:
  """This process's claim and lock on a trial that needs a run."""
  trial_dir: str
  claim: trial_claims.Claim
  lock_fd: int | None
  started: str = ""
  command: list[str] = dataclasses.field(default_factory=list)
  population: list[str] | None = None

  def start(self, command: Sequence[str],
            population: Sequence[str] | None = None) -> None:
    """Notes the run's start: its command and the population it trains in."""
    self.started = now()
    self.command = list(command)
    self.population = list(population) if population is not None else None

  def _write(self, status: str, **fields: Any) -> None:
    if self.population is not None:
      fields["population"] = self.population
    records.write_runner(self.trial_dir, status, started=self.started,
                         command=self.command, **fields)

  def running(self, pid: int) -> None:
    self._write(records.RUNNING, pid=pid)

  def end(self, returncode: int | None, error: str | None = None) -> None:
    """Records the run's end: interrupted when its process stopped on SIGTERM
    (it saved its state: relaunching resumes it), else exited."""
    if returncode == termination.TERMINATED_EXIT_CODE and error is None:
      self.interrupted(returncode)
    else:
      self._write(records.EXITED, returncode=returncode, error=error,
                  finished=now())

  def interrupted(self, returncode: int | None) -> None:
    """Records a run stopped to be resumed (relaunching resumes it)."""
    self._write(records.INTERRUPTED, returncode=returncode, finished=now())

  def refresh(self) -> None:
    """Renews the claim's heartbeat (at most every HEARTBEAT_SECONDS)."""
    self.claim.refresh()

  def release(self) -> None:
    """Gives the lock and the claim up (another runner may take the trial)."""
    if self.lock_fd is not None:
      os.close(self.lock_fd)
      self.lock_fd = None
    self.claim.release()


def acquire(trial_dir: str) -> Lease | None:
  """A lease on the trial, or None when another runner holds it or it needs
  no run (see `records.needs_run`)."""
  lease = _hold(trial_dir)
  if lease is not None and not records.needs_run(trial_dir):  # Ended meanwhile.
    lease.release()
    return None
  return lease


def release_failed(trial_dir: str) -> bool:
  """Makes a failed trial a trial to run again (resuming from its latest
  checkpoint): its failed summary.json goes, runner.json says interrupted
  and keeps the failure. Returns whether it was failed and released."""
  lease = _hold(trial_dir)
  if lease is None:
    return False
  try:
    record = records.trial_status(trial_dir, check_lock=False)
    if record["status"] != records.FAILED:
      return False
    records.remove_unfinished_summary(trial_dir)
    previous = json_records.read_optional(
        os.path.join(trial_dir, records.RUNNER_FILE)) or {}
    records.write_runner(trial_dir, records.INTERRUPTED,
                         **{k: v for k, v in previous.items() if k != "status"},
                         released_failure=record["reason"], released=now())
    return True
  finally:
    lease.release()


def _hold(trial_dir: str) -> Lease | None:
  """The trial's claim and lock, or None when another runner holds either."""
  claim = trial_claims.try_claim(trial_dir)
  if claim is None:
    return None
  lock_fd = try_lock(trial_dir)
  if lock_fd is None:  # Run by a process still shutting down.
    claim.release()
    return None
  return Lease(trial_dir, claim, lock_fd)
