r"""A long-lived study worker: trains unfinished trials in this one process.

  python -m tuning_playbook.study_worker --config=configs/mnist1d_cnn.py \
      --study_dir=runs/study [--study_dir=...] [--vectorize=8] \
      [--config.<key>=<value> ...]

`tuning_playbook.sweep --run` starts --parallel of these (the config flags are
the sweep's own); each keeps its imports, data sets and compiled steps from
trial to trial, so a study pays one process start and, per structure, one
compilation, not one per trial. With `--vectorize=K` the worker takes up to K
trials of one structure and resume step at a time and trains them as one
population (population.py); a trial with no partner, or with K = 1, trains
alone exactly as `tuning_playbook.main` would train it.

Trials are taken as the process-per-trial runner takes them (`trial_lease`:
a claim file with a heartbeat, and the trial's `.lock` for as long as the
worker trains it), so any number of workers on any machines sharing the study
directory never train a trial twice; a worker exits when no unclaimed
unfinished trial is left. Each trial's `log.txt` gets the log lines of the
population it trained in (its own metrics and the population's lines), and
`runner.json` names the worker.

An error in a population marks its trials failed (summary.json, as a trial
process would) and the worker goes on with the next trials. Bad input (a
config or work directory the trainer refuses) fails only the trial at fault,
with the message: the others of its population train without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging as std_logging
import os
import sys
import threading
from typing import Any, Iterator, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from tuning_playbook.common import cli
from tuning_playbook.common import cpu_devices
from tuning_playbook.common import json_records
from tuning_playbook.common import platform_check
from tuning_playbook.common import records
from tuning_playbook.common import termination
from tuning_playbook.studies import commands
from tuning_playbook.studies import study as study_lib
from tuning_playbook.studies import trial_lease
from tuning_playbook.training import trial_logs
from tuning_playbook.training import trial_setup
from tuning_playbook import workload as workload_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The study's config file.", lock_config=True)
_STUDY_DIRS = flags.DEFINE_multi_string(
    "study_dir", None, "A study directory (repeatable: a sweep's sub-studies).")
_VECTORIZE = flags.DEFINE_integer(
    "vectorize", 1, "Trials trained at once as one population.", lower_bound=1)
_RETRY_FAILED = flags.DEFINE_bool(
    "retry_failed", False, "Train failed trials again (diverged ones stay).")


@dataclasses.dataclass
class _Trial:
  trial_dir: str
  config: ml_collections.ConfigDict


@dataclasses.dataclass
class _Claimed:
  trial: _Trial
  lease: trial_lease.Lease


def study_trials(config: ml_collections.ConfigDict,
                 studies: Sequence[study_lib.Study]) -> list[_Trial]:
  """Every trial with its resolved config, interleaved across the studies."""
  out = []
  for position in range(max((len(s.trials) for s in studies), default=0)):
    for s in studies:
      if position < len(s.trials):
        trial = s.trials[position]
        out.append(_Trial(s.trial_dir(trial), study_lib.resolve_trial_config(
            config, {**s.fixed, **trial.params}, what=f"trial {s.trial_dir(trial)}")))
  return out


def check_trial_configs(trials: Sequence[_Trial]) -> None:
  """Raises StudyError when the worker's config is not the study's: every
  trial whose config.json exists (the sweep writes them) holds another one.
  One trial at odds with its config.json is that trial's bad input, reported
  when it trains; all of them at odds are the worker's --config."""
  differences = []
  for trial in trials:
    recorded = os.path.join(trial.trial_dir, records.CONFIG_FILE)
    try:
      old = json_records.read_optional(recorded)
    except json_records.RecordFileError:
      return  # The trial's own bad input, reported when it trains.
    if old is None:
      continue
    lines = records.config_differences(old, records.config_to_dict(trial.config))
    if not lines:
      return
    differences.append((recorded, lines))
  if differences:
    recorded, lines = differences[0]
    raise study_lib.StudyError(
        f"--config and its --config.* flags differ from the config of every "
        f"trial of the study (e.g. {recorded}): " + "; ".join(lines) + ". "
        "Launch the worker with the study's --config and --config.* flags "
        f"({study_lib.STUDY_FILE}: config, config_overrides); nothing was "
        "changed")


def latest_checkpoint_step(trial_dir: str) -> int | None:
  """The newest finished checkpoint's step (Orbax names them by step)."""
  try:
    names = os.listdir(os.path.join(trial_dir, records.CHECKPOINTS_DIR))
  except OSError:
    return None
  steps = [int(n) for n in names if n.isdigit()]
  return max(steps) if steps else None


class Worker:
  """Claims and trains trials until none unclaimed and unfinished is left."""

  def __init__(self, trials: Sequence[_Trial], vectorize: int):
    self.trials = list(trials)
    self.vectorize = vectorize
    # Data sets and programs, kept from one population to the next.
    self.cache = trial_setup.SetupCache()
    self.trained = 0

  def _needs_run(self, trial: _Trial) -> bool:
    return records.needs_run(trial.trial_dir)

  def _group_key(self, trial: _Trial) -> tuple[str, int | None] | None:
    """(structure, resume step); None when the trial must train alone."""
    from tuning_playbook.training import population  # pylint: disable=g-import-not-at-top
    try:
      workload = trial_setup.validate_before_compiling(trial.config)
    except Exception:  # pylint: disable=broad-except
      return None  # Reported when it trains (alone).
    # What only trains alone (profile_steps, several processes) never groups.
    if population.refusal([trial.config] * 2, [workload] * 2) is not None:
      return None
    return (population.structure_key(trial.config, workload),
            latest_checkpoint_step(trial.trial_dir))

  def _claim(self, trial: _Trial) -> _Claimed | None:
    lease = trial_lease.acquire(trial.trial_dir)
    return None if lease is None else _Claimed(trial, lease)

  def next_group(self) -> list[_Claimed]:
    """Claims the next population: up to `vectorize` trials of one key."""
    group: list[_Claimed] = []
    key = None
    for trial in self.trials:
      if len(group) == self.vectorize:
        break
      if not self._needs_run(trial):
        continue
      if group:
        if key is None or self._group_key(trial) != key:
          continue
      claimed = self._claim(trial)
      if claimed is None:
        continue
      if not group:
        key = self._group_key(trial) if self.vectorize > 1 else None
        if key is None:
          return [claimed]
      group.append(claimed)
    return group

  def run(self) -> int:
    """Trains groups until none is left; returns how many trials it trained."""
    while True:
      group = self.next_group()
      if not group:
        return self.trained
      self._train(group)
      self.trained += len(group)

  def _train(self, group: list[_Claimed]) -> None:
    dirs = [c.trial.trial_dir for c in group]
    for c in group:
      c.lease.start(sys.argv, population=dirs)
      c.lease.running(os.getpid())
    stop = threading.Event()
    heartbeat = threading.Thread(
        target=_refresh_leases, args=([c.lease for c in group], stop),
        daemon=True, name="claim-heartbeat")
    heartbeat.start()
    # Per trial directory: (exit status as a trial process, error).
    outcomes: dict[str, tuple[int, str | None]] | None = {}
    interrupted = lambda: _give_back(group)
    try:
      started = group[0].lease.started
      with _logging_to(dirs, started, sys.argv), termination.at_forced_exit(interrupted):
        logging.info("Training %d trial(s) as one population: %s", len(dirs),
                     ", ".join(dirs))
        outcomes = self._train_logged(group)
    except termination.Preempted:
      stop.set()
      interrupted()
      outcomes = None
      raise
    finally:
      stop.set()
      for c in group if outcomes is not None else ():
        c.lease.end(*outcomes.get(c.trial.trial_dir, (1, None)))
      for c in group:
        c.lease.release()

  def _train_logged(self, group: list[_Claimed]) -> dict[str, tuple[int, str | None]]:
    """Trains the group; returns each trial directory's (exit status as a
    trial process, error).

    A trial whose config or directory is refused is reported alone and the
    others train without it; if the population itself is then refused (a
    directory's records, say), its trials train one by one, so that only the
    trial at fault fails.
    """
    from tuning_playbook.training import run  # pylint: disable=g-import-not-at-top
    from tuning_playbook.training import train  # pylint: disable=g-import-not-at-top
    trials = [c.trial for c in group]
    outcomes: dict[str, tuple[int, str | None]] = {}
    if len(trials) > 1:
      for t in trials:
        error = _refusal(t)
        if error is not None:
          logging.error("Bad input (%s): %s", t.trial_dir, error)
          outcomes[t.trial_dir] = (cli.BAD_INPUT_EXIT_CODE, error)
      trials = [t for t in trials if t.trial_dir not in outcomes]
    if len(trials) > 1:
      try:
        # Each trial's workload is bound to its own config.
        train.Trainer([t.config for t in trials], [t.trial_dir for t in trials],
                      [trial_setup.validate_before_compiling(t.config)
                       for t in trials], cache=self.cache).run()
        outcomes.update({t.trial_dir: (0, None) for t in trials})
        return outcomes
      except run.BAD_INPUT_ERRORS as e:
        logging.error("Bad input in the population (%s); training its trials "
                      "one by one.", e)
      except Exception as e:  # pylint: disable=broad-except
        logging.exception("Population failed.")
        for t in trials:
          _record_failed(t, e)
          outcomes[t.trial_dir] = (1, None)
        return outcomes
    for t in trials:
      outcomes[t.trial_dir] = _train_alone(t, self.cache)
    return outcomes


def _give_back(group: Sequence[_Claimed]) -> None:
  """Marks the group's trials interrupted (relaunching resumes them) and
  releases them, so that another worker takes them at once."""
  for c in group:
    c.lease.interrupted(termination.TERMINATED_EXIT_CODE)
  for c in group:
    c.lease.release()


def _refusal(trial: _Trial) -> str | None:
  """Why the trainer would refuse this trial's config or directory, if it would."""
  from tuning_playbook.training import run  # pylint: disable=g-import-not-at-top
  try:
    trial_setup.validate_before_compiling(trial.config)
    records.check_or_write_config(trial.trial_dir, trial.config, write=False)
  except run.BAD_INPUT_ERRORS as e:
    return str(e)
  return None


def _train_alone(trial: _Trial, cache: Any) -> tuple[int, str | None]:
  """Trains one trial as `tuning_playbook.main` would; (exit status, error)."""
  from tuning_playbook.training import run  # pylint: disable=g-import-not-at-top
  try:
    run.run_trial(trial.config, trial.trial_dir, cache)
    return 0, None
  except run.BAD_INPUT_ERRORS as e:
    logging.error("Bad input: %s", e)
    return cli.BAD_INPUT_EXIT_CODE, str(e)
  except Exception as e:  # pylint: disable=broad-except
    _record_failed(trial, e)
    return 1, None


def _record_failed(trial: _Trial, error: Exception) -> None:
  """Marks an unfinished trial failed, as a failing trial process does."""
  from tuning_playbook.training import run  # pylint: disable=g-import-not-at-top
  summary = records.read_summary(trial.trial_dir)
  if summary and summary.get("status") in records.ENDED_STATUSES:
    return
  records.write_summary(trial.trial_dir, run.failed_summary(trial.config, error))


def _refresh_leases(leases: Sequence[trial_lease.Lease],
                    stop: threading.Event) -> None:
  while not stop.wait(1.0):
    for lease in leases:
      lease.refresh()


@contextlib.contextmanager
def _logging_to(trial_dirs: Sequence[str], started: str,
                command: Sequence[str]) -> Iterator[None]:
  """Copies this process's log lines into each trial's log.txt meanwhile
  (lines about one trial only into its own)."""
  handlers = []
  for trial_dir in trial_dirs:
    path = os.path.join(trial_dir, records.LOG_FILE)
    with open(path, "a") as f:
      line = commands.command_line(command)
      f.write(f"=== {started} worker {os.getpid()}: {line}\n")
    handler = std_logging.FileHandler(path)
    handler.setFormatter(std_logging.Formatter(
        "%(asctime)s %(levelname)s %(message)s"))
    handler.addFilter(cli.QuietLibraries())
    handler.addFilter(trial_logs.OnlyAbout(trial_dir))
    handlers.append(handler)
  root = std_logging.getLogger()
  for handler in handlers:
    root.addHandler(handler)
  try:
    yield
  finally:
    for handler in handlers:
      root.removeHandler(handler)
      handler.close()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  config = cli.loaded_config(_CONFIG)
  try:  # The workload before the trainer's imports, as tuning_playbook.main.
    workload_lib.load_workload(config.workload)
  except workload_lib.UnknownWorkloadError as e:
    cli.fail(str(e))
  try:  # The studies before the accelerators: bad input is refused at once.
    studies = [study_lib.load_study(d) for d in _STUDY_DIRS.value]
    trials = study_trials(config, studies)
    check_trial_configs(trials)
  except study_lib.StudyError as e:
    cli.fail(str(e))
  cpu_devices.configure_thread_pool()  # Before the backend starts.
  termination.install_sigterm_exit()
  try:  # The platform line, and the config's accelerator requirement.
    platform_check.check_platform(config.require_accelerator,
                                  "config.require_accelerator")
  except platform_check.NoAcceleratorError as e:
    cli.fail(str(e))
  try:
    if _RETRY_FAILED.value:  # Once, before training: see trial_lease.
      released = [t for t in trials if trial_lease.release_failed(t.trial_dir)]
      logging.info("Failed trials to train again: %d", len(released))
    trained = Worker(trials, _VECTORIZE.value).run()
  except json_records.RecordFileError as e:
    cli.fail(str(e))
  logging.info("No unclaimed unfinished trial left; trained %d.", trained)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "study_dir"])
  app.run(main, flags_parser=cli.parse_flags)
