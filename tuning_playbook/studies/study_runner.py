"""Runs the trials of studies as local subprocesses, K at a time.

  jobs = [TrialJob(study.trial_dir(t), study.command(t, sys.executable))
          for t in study.trials]
  run_trials(jobs, parallel=2, on_update=lambda job: ...)

Each trial runs in its own process with its output appended to
`<trial_dir>/log.txt`. Finished trials (completed, diverged, failed) are
skipped, so relaunching resumes a study: an interrupted trial is simply run
again and the trainer resumes it from its latest checkpoint.

Safety when a sweep is killed: on Linux every trial process is told to
receive SIGTERM when the sweep dies, and each trial holds an exclusive lock
on `<trial_dir>/.lock` for as long as its process lives, so a relaunched
sweep waits for a trial that is still shutting down (or that another sweep is
running) instead of starting a second copy of it.

Across machines sharing the study directory, a runner takes a trial through
a lease (`trial_lease`: a claim file with a heartbeat, safe on NFS, then the
lock) and keeps it while the trial runs. With `leave_claimed=True` (a
worker) trials held by a live runner elsewhere are left to it, so the call
returns once no unheld unfinished trial is left; otherwise they are waited
for.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Mapping, Sequence

from tuning_playbook.common import records
from tuning_playbook.studies import commands
from tuning_playbook.studies import trial_lease

_PR_SET_PDEATHSIG = 1
# A terminated trial or worker saves a checkpoint and exits within its
# config's preemption_deadline_seconds (default 60) before it is killed.
_TERMINATE_GRACE_SECONDS = 90.0


@dataclasses.dataclass(frozen=True)
class TrialJob:
  """One trial to run: where it lives and the command that runs it."""
  trial_dir: str
  argv: Sequence[str]


def _die_with_parent_fn() -> Callable[[], None] | None:
  """A preexec_fn asking Linux to SIGTERM the child when the sweep dies."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(None, use_errno=True)
  except OSError:
    return None
  parent = os.getpid()

  def preexec():
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # The sweep died before prctl took effect.
      os._exit(1)
  return preexec


@dataclasses.dataclass
class _Running:
  job: TrialJob
  process: subprocess.Popen
  lease: trial_lease.Lease


def wait_for_claims_elsewhere(trial_dirs: Sequence[str], *,
                              on_poll: Callable[[], None] | None = None,
                              poll_seconds: float = 2.0) -> bool:
  """Waits while unfinished trials are held by runners elsewhere.

  Returns False once every unfinished trial has finished, True as soon as one
  of them is unfinished and held by nobody (its runner stopped, its claim went
  stale, or it was released after the caller's workers passed it over): it is
  for the caller to train. `on_poll()` runs every `poll_seconds` (to refresh
  the records).
  """
  logged = False
  while True:
    unfinished = [d for d in trial_dirs if records.needs_run(d)]
    released = [d for d in unfinished if not trial_lease.held_elsewhere(d)]
    if released:
      logging.info("Trial(s) left unfinished and unclaimed: %s",
                   ", ".join(released))
      return True
    if not unfinished:
      return False
    if not logged:
      logging.info("Waiting for %d trial(s) claimed by runners elsewhere: %s",
                   len(unfinished), ", ".join(unfinished))
      logged = True
    time.sleep(poll_seconds)
    if on_poll is not None:
      on_poll()


def _launch(job: TrialJob, lease: trial_lease.Lease, cwd: str | None,
            env: dict[str, str] | None) -> _Running | None:
  """Starts the trial; None (recorded as failed) if it cannot be started."""
  lease.start(job.argv)
  with open(os.path.join(job.trial_dir, records.LOG_FILE), "ab") as log:
    command = commands.command_line(job.argv)
    log.write(f"=== {lease.started} launch: {command}\n".encode())
    log.flush()
    try:
      process = subprocess.Popen(
          list(job.argv), stdout=log, stderr=subprocess.STDOUT,
          stdin=subprocess.DEVNULL, cwd=cwd, env=env,
          pass_fds=(lease.lock_fd,), preexec_fn=_die_with_parent_fn())
    except (OSError, subprocess.SubprocessError) as e:
      log.write(f"could not start the trial: {e}\n".encode())
      lease.end(None, error=f"could not start the trial: {e}")
      lease.release()
      return None
  lease.running(process.pid)
  return _Running(job, process, lease)


def _stop_all(running: list[_Running]) -> None:
  for run in running:
    if run.process.poll() is None:
      run.process.terminate()
  deadline = time.monotonic() + _TERMINATE_GRACE_SECONDS
  for run in running:
    try:
      run.process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      run.process.kill()
      run.process.wait()
    run.lease.interrupted(run.process.returncode)
    run.lease.release()


def run_trials(jobs: Sequence[TrialJob], parallel: int, *,
               on_update: Callable[[TrialJob], None] | None = None,
               cwd: str | None = None, env: dict[str, str] | None = None,
               poll_seconds: float = 0.2, leave_claimed: bool = False) -> int:
  """Runs the unfinished `jobs`, at most `parallel` at once; returns how many
  were launched. A failing trial never stops the others. `on_update(job)` is
  called after a trial starts and after it ends (to refresh the records).

  Interrupting the call (KeyboardInterrupt, SystemExit) terminates the running
  trials, marks them interrupted, and re-raises. `leave_claimed`: skip trials
  another live runner has claimed instead of waiting for them.
  """
  if parallel < 1:
    raise ValueError(f"parallel={parallel}: must be >= 1")
  pending = collections.deque(
      j for j in jobs if records.needs_run(j.trial_dir))
  running: list[_Running] = []
  launched = 0
  try:
    while pending or running:
      blocked = 0
      while pending and len(running) < parallel and blocked < len(pending):
        job = pending.popleft()
        lease = trial_lease.acquire(job.trial_dir)
        if lease is None:
          if not records.needs_run(job.trial_dir):
            continue  # Finished by whoever held it.
          if leave_claimed and trial_lease.held_elsewhere(job.trial_dir):
            continue  # Another runner, here or on another machine, has it.
          pending.append(job)  # Run by another runner, or shutting down.
          blocked += 1
          continue
        logging.info("Launching trial %s", job.trial_dir)
        run = _launch(job, lease, cwd, env)
        if run is not None:
          running.append(run)
          launched += 1
        if on_update is not None:
          on_update(job)
      time.sleep(poll_seconds)
      for run in running:
        run.lease.refresh()
      for run in list(running):
        if run.process.poll() is not None:
          running.remove(run)
          run.lease.end(run.process.returncode)
          run.lease.release()
          record = records.trial_status(run.job.trial_dir)
          logging.info("Trial %s: %s%s", run.job.trial_dir, record["status"],
                       f" ({record['reason']})" if record["reason"] else "")
          if on_update is not None:
            on_update(run.job)
  except BaseException:
    _stop_all(running)
    raise
  return launched


def run_workers(argv: Sequence[str], count: int, *, log_dir: str,
                cwd: str | None = None, env: dict[str, str] | None = None,
                on_poll: Callable[[], None] | None = None,
                poll_seconds: float = 2.0,
                worker_env: Sequence[Mapping[str, str]] | None = None
                ) -> list[int]:
  """Runs `count` copies of a study worker command until all exit.

  Returns their exit statuses. Worker i writes its output to
  `<log_dir>/worker-<i>.log` (appended), after a launch line naming the
  variables `worker_env[i]` adds to `env` (e.g. its CUDA_VISIBLE_DEVICES);
  like trial processes, workers get SIGTERM when this process dies.
  `on_poll()` runs every `poll_seconds` (to refresh the records).
  Interrupting the call terminates the workers (SIGTERM, then SIGKILL after
  a grace period) and re-raises.
  """
  if worker_env is not None and len(worker_env) != count:
    raise ValueError(f"{len(worker_env)} worker environments for {count} workers")
  os.makedirs(log_dir, exist_ok=True)
  processes = []
  try:
    for i in range(count):
      extra = dict(worker_env[i]) if worker_env is not None else {}
      if extra:
        logging.info("Study worker %d: %s", i, commands.environment_prefix(extra))
      with open(os.path.join(log_dir, f"worker-{i}.log"), "ab") as log:
        command = " ".join(filter(None, [commands.environment_prefix(extra),
                                         commands.command_line(argv)]))
        log.write(f"=== {trial_lease.now()} launch: {command}\n".encode())
        log.flush()
        processes.append(subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=cwd,
            env=({**(os.environ if env is None else env), **extra}
                 if extra else env),
            preexec_fn=_die_with_parent_fn()))
    while running := [p for p in processes if p.poll() is None]:
      try:  # Returns as soon as the last worker exits.
        running[0].wait(timeout=poll_seconds)
      except subprocess.TimeoutExpired:
        pass
      if on_poll is not None:
        on_poll()
  except BaseException:
    for p in processes:
      if p.poll() is None:
        p.terminate()
    deadline = time.monotonic() + _TERMINATE_GRACE_SECONDS
    for p in processes:
      try:
        p.wait(timeout=max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    raise
  for i, p in enumerate(processes):
    if p.returncode:
      logging.warning("Study worker %d exited with status %d; see %s", i,
                      p.returncode, os.path.join(log_dir, f"worker-{i}.log"))
  return [p.returncode for p in processes]
