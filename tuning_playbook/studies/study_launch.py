"""Records planned studies and runs their trials: what every study launcher does.

  studies = study.plan_studies(...)
  study.write_studies(studies, config)
  study_launch.launch(studies, table="runs/studies.csv", command=command,
                      run=True, parallel=2)

writes each study's `results.csv` and tracking-table row, prints one trainer
command per trial with `print_commands`, and with `run` runs the unfinished
trials (relaunching resumes), refreshing the records as trials start and end.
Used by `tuning_playbook.sweep` and `tuning_playbook.playbook`.

Trials run in study workers (`study_worker.py`, `--vectorize` trials at a
time) or, with `isolation="process"`, one trainer process each
(`study_runner.run_trials`); see `resolve_isolation`. On a host with GPUs or
TPU chips each study worker owns its own devices, one worker per
`devices_per_worker` of them by default (`worker_devices`).

Every trial or worker process of a launch shares one JAX persistent compilation cache,
`<study_dir>/.jax_cache` (the studies' common directory when there are
several), with no minimum compile time or entry size, so a trial whose
programs have the shapes of an earlier one loads them instead of compiling.
`JAX_COMPILATION_CACHE_DIR` and the two minimums, when set, are kept.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from typing import Any, Callable, Mapping, Sequence

from absl import logging

from tuning_playbook.common import records
from tuning_playbook.studies import code_version
from tuning_playbook.studies import commands
from tuning_playbook.studies import study as study_lib
from tuning_playbook.studies import study_runner
from tuning_playbook.studies import trial_lease
from tuning_playbook.studies import tracking
from tuning_playbook.studies import worker_devices

# Given the tracking record of a finished trial, whether the trials after it
# are not to be launched (e.g. a batch size that did not fit in memory).
StopRule = Callable[[Mapping[str, Any]], bool]

COMPILATION_CACHE_DIR = ".jax_cache"
WORKER_LOGS_DIR = "workers"


def default_tracking_table(study_dir: str) -> str:
  """`<parent of study_dir>/studies.csv`: studies side by side share it."""
  parent = os.path.dirname(os.path.normpath(study_dir)) or "."
  return os.path.join(parent, tracking.TRACKING_TABLE_FILE)


def compilation_cache_environment(studies: Sequence[study_lib.Study]
                                  ) -> dict[str, str]:
  """The JAX settings of the shared compilation cache, as environment variables."""
  return compilation_cache_settings(
      os.path.commonpath([os.path.abspath(s.study_dir) for s in studies]))


def compilation_cache_settings(root: str) -> dict[str, str]:
  """The JAX settings of a compilation cache in `root`/.jax_cache."""
  return {"JAX_COMPILATION_CACHE_DIR": os.path.join(root, COMPILATION_CACHE_DIR),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          # -1: no minimum size, and no backend's own minimum either.
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}


def trial_environment(studies: Sequence[study_lib.Study]) -> dict[str, str]:
  """This process's environment with the shared compilation cache added."""
  return {**compilation_cache_environment(studies), **os.environ}


@dataclasses.dataclass(frozen=True)
class LaunchOptions:
  """How to record and run a list of studies."""
  table: str
  command: str
  print_commands: bool = False
  run: bool = False
  # Trial processes or study workers at once. None: 1 trial process; study
  # workers, as many as the GPUs or TPU chips allow (1 on a CPU host).
  parallel: int | None = None
  retry_failed: bool = False
  # With a stop rule, trials run one at a time in order, and none is launched
  # after a trial whose record satisfies it.
  stop_rule: StopRule | None = None
  # A worker: trials another live runner (here or elsewhere) claimed are left
  # to it, and the launch ends when no unclaimed unfinished trial is left.
  # Otherwise the launch waits for such trials to finish.
  worker: bool = False
  # Trials trained at once as one population (study workers only).
  vectorize: int = 1
  # "worker", "process" or "auto" (see resolve_isolation).
  isolation: str = "auto"
  # GPUs or TPU chips each study worker owns (None: 1; CPU hosts: unset).
  devices_per_worker: int | None = None
  # Study workers may outnumber the groups of devices (GPUs only).
  share_devices: bool = False


class LaunchError(ValueError):
  """Launch options that do not go together."""


def resolve_isolation(studies: Sequence[study_lib.Study],
                      options: LaunchOptions) -> str:
  """"worker" or "process": how the trials run.

  Study workers (study_worker.py) run the framework's own trainer and run
  every trial; a custom trainer module, or a stop rule that must see each
  trial end before launching the next, needs one process per trial.
  """
  custom = [s.trainer_module for s in studies
            if s.trainer_module != commands.DEFAULT_TRAINER]
  needs_process = (f"--trainer_module={custom[0]}" if custom else
                   "a procedure that stops early" if options.stop_rule else None)
  isolation = options.isolation
  if isolation == "auto":
    isolation = "process" if needs_process else "worker"
  if isolation == "worker" and needs_process:
    raise LaunchError(f"--isolation=worker cannot run {needs_process}: use "
                      "--isolation=process")
  worker_flags = []
  if options.vectorize > 1:
    worker_flags.append(f"--vectorize={options.vectorize}")
  if options.devices_per_worker is not None:
    worker_flags.append(f"--devices_per_worker={options.devices_per_worker}")
  if options.share_devices:
    worker_flags.append("--share_devices")
  if worker_flags and isolation != "worker":
    raise LaunchError(
        f"study workers are needed for {' '.join(worker_flags)}, but these "
        f"trials run one process each ({needs_process or '--isolation=process'})")
  return isolation


def worker_environments(options: LaunchOptions) -> list[dict[str, str]]:
  """The variables each study worker gets: its own GPUs or TPU chips.

  One dict per worker (empty on a CPU host). Raises LaunchError for worker
  counts this host's devices cannot serve.
  """
  host = worker_devices.read_host()
  try:
    return worker_devices.worker_environments(
        worker_devices.find_devices(host), parallel=options.parallel,
        devices_per_worker=options.devices_per_worker,
        share=options.share_devices, environ=host.environ)
  except worker_devices.DeviceError as e:
    raise LaunchError(str(e)) from e


def worker_command(studies: Sequence[study_lib.Study],
                   options: LaunchOptions) -> list[str]:
  """The study worker command line that trains these studies' trials."""
  first = studies[0]
  flags = [f"--config={first.config_path}"]
  flags += [f"--study_dir={s.study_dir}" for s in studies]
  flags.append(f"--vectorize={options.vectorize}")
  return commands.module_argv("tuning_playbook.study_worker", flags,
                              overrides=first.config_overrides,
                              python=sys.executable)


def _raise_system_exit(signum, frame):  # pylint: disable=unused-argument
  sys.exit(128 + signum)


def _interleaved_jobs(studies: Sequence[study_lib.Study]
                      ) -> list[tuple[study_runner.TrialJob, study_lib.Study]]:
  """Every trial's job, interleaved so every study advances evenly."""
  out = []
  for position in range(max(len(s.trials) for s in studies)):
    for s in studies:
      if position < len(s.trials):
        trial = s.trials[position]
        out.append((study_runner.TrialJob(s.trial_dir(trial),
                                          s.command(trial, sys.executable)), s))
  return out


def _run_until_stopped(jobs: Sequence[study_runner.TrialJob],
                       options: LaunchOptions,
                       on_update: Callable[[study_runner.TrialJob], None],
                       env: dict[str, str]) -> None:
  for job in jobs:
    study_runner.run_trials([job], 1, on_update=on_update, env=env)
    record = records.trial_status(job.trial_dir)
    if options.stop_rule(record):
      logging.info("Trial %s: %s (%s); the later trials are not launched.",
                   job.trial_dir, record["status"], record["reason"])
      return


def launch(studies: Sequence[study_lib.Study], options: LaunchOptions) -> None:
  """Records the studies, then prints and/or runs their trials.

  Raises LaunchError, before anything is written, for options that do not
  go together.
  """
  isolation = resolve_isolation(studies, options) if options.run else None
  worker_env = (worker_environments(options) if isolation == "worker"
                else None)
  version = code_version.describe(studies[0].config_path)

  def record(s: study_lib.Study) -> list[dict[str, Any]]:
    rows = tracking.write_results(s)
    tracking.update_tracking_table(
        options.table, tracking.study_row(s, rows, options.command, version))
    return rows

  for s in studies:
    record(s)
    logging.info("Study %s: %d trials in %s", s.name, len(s.trials),
                 s.study_dir)
  if options.print_commands:
    for s in studies:
      for t in s.trials:
        print(s.command_line(t), flush=True)
  if options.run:
    signal.signal(signal.SIGTERM, _raise_system_exit)
    pairs = _interleaved_jobs(studies)
    owner = {job.trial_dir: s for job, s in pairs}
    jobs = [job for job, _ in pairs]
    on_update = lambda job: record(owner[job.trial_dir])
    env = trial_environment(studies)
    if options.retry_failed:  # Once, before any runner: see trial_lease.
      released = [job.trial_dir for job in jobs
                  if trial_lease.release_failed(job.trial_dir)]
      logging.info("Failed trials to run again: %d", len(released))
      for s in studies:
        record(s)
    try:
      if isolation == "worker":
        root = os.path.commonpath([os.path.abspath(s.study_dir) for s in studies])
        on_poll = lambda: [record(s) for s in studies]
        while True:
          study_runner.run_workers(
              worker_command(studies, options), len(worker_env),
              log_dir=os.path.join(root, WORKER_LOGS_DIR), env=env,
              on_poll=on_poll, worker_env=worker_env)
          # Workers leave trials that runners elsewhere claimed; a launch
          # that is not itself a worker waits for them, as the trial runner
          # does, and trains any that such a runner gave up unfinished.
          if options.worker or not study_runner.wait_for_claims_elsewhere(
              [job.trial_dir for job in jobs],
              on_poll=on_poll):
            break
      elif options.stop_rule is None:
        study_runner.run_trials(jobs, options.parallel or 1,
                                on_update=on_update, env=env,
                                leave_claimed=options.worker)
      else:
        _run_until_stopped(jobs, options, on_update, env)
    finally:
      for s in studies:
        record(s)
  for s in studies:
    rows = record(s)
    counts = {}
    for row in rows:
      counts[row["status"]] = counts.get(row["status"], 0) + 1
    logging.info("Study %s: %s; results in %s", s.name,
                 ", ".join(f"{n} {k}" for k, n in sorted(counts.items())),
                 os.path.join(s.study_dir, tracking.RESULTS_FILE))
