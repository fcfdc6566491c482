"""A trial's place in the training loop, and its rows of the metrics buffer.

The train step writes each step's metrics into a device buffer of
`log_every_steps` rows per trial (row `(step - 1) % log_every_steps`); a log
step fetches the rows of each due trial's open interval. `TrialRun` holds a
trial's records, its open interval and CLU's progress action; `PendingLog`
is a fetch on its way to the host.

  trials = [TrialRun(records, last_step, active=True) for ...]
  open_logs(trials, step)
  buffer = resumed_metrics(trials, config.log_every_steps)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from absl import logging
from clu import periodic_actions
import jax
import numpy as np

from tuning_playbook.training import distributed
from tuning_playbook.training import population
from tuning_playbook.training import train_step as train_step_lib
from tuning_playbook.training import trial_records
from tuning_playbook.training import trial_setup


@dataclasses.dataclass
class TrialRun:
  """One trial's records and its place in the loop."""
  records: trial_records.TrialRecords
  last_step: int
  active: bool
  progress: periodic_actions.ReportProgress | None = None
  first: int = 1  # The first step of its open log interval,
  started: float = 0.0  # that interval's start clock,
  waited: float = 0.0  # and its seconds spent waiting for input.
  reason: str | None = None  # Why it diverged, if it did.
  summary: dict[str, Any] | None = None


@dataclasses.dataclass
class PendingLog:
  """The metrics of a log step for its due trials, on their way to the host;
  per due trial, its interval's first step, start clock and input wait."""
  step: int
  due: list[int]
  evals: list[int]
  first: list[int]
  started: list[float]
  waited: list[float]
  buffer: jax.Array


def open_logs(trials: Sequence[TrialRun], step: int) -> None:
  """Opens each trial's logs (resuming its open interval, if it was
  stopped between log steps) and its progress scalars (CLU)."""
  for t in trials:
    t.records.open_logs()
    t.active = step < t.last_step
    resumed = t.records.open_interval
    t.first = step + 1 if resumed is None else resumed["first"]
    # Called at log steps only, which is all it needs to report steps/s.
    t.progress = periodic_actions.ReportProgress(
        num_train_steps=t.last_step, writer=t.records.writer,
        every_steps=None, every_secs=None,
        on_steps=range(0, t.last_step + 1, t.records.config.log_every_steps))


def resumed_metrics(trials: Sequence[TrialRun], log_every_steps: int) -> np.ndarray:
  """The metrics buffer, holding the steps that a run stopped between log
  steps trained but had not recorded (`TrialRecords.save_to_resume`)."""
  buffer = np.zeros((len(trials), log_every_steps, len(train_step_lib.STEP_METRICS)),
                    np.float32)
  for i, t in enumerate(trials):
    resumed = t.records.open_interval or {"first": 0, "fetched": []}
    for step, metrics in enumerate(resumed["fetched"], resumed["first"]):
      buffer[i, (step - 1) % log_every_steps] = [
          metrics[k] for k in train_step_lib.STEP_METRICS]
  return buffer


def fetched_rows(buffer: np.ndarray, trial: int, first: int,
                 last: int) -> list[dict[str, float]]:
  """Trial `trial`'s metrics of steps first..last, from a fetched buffer."""
  rows = buffer[trial, [(s - 1) % buffer.shape[1] for s in range(first, last + 1)]]
  return [dict(zip(train_step_lib.STEP_METRICS, map(float, r))) for r in rows]


def restore_or_init(programs: trial_setup.Programs,
                    trials: Sequence[TrialRun]) -> tuple[Any, int]:
  """The stacked state and its step: every trial's latest checkpoint (all at
  one step), or every trial initialised from its seed at step 0."""
  latest = {t.records.latest_step() for t in trials}
  if len(latest) > 1:
    raise population.PopulationError(
        "the trials' latest checkpoints are at different steps "
        f"({sorted(map(str, latest))}); group trials by their resume step")
  latest_step = latest.pop()
  if latest_step is None:
    # Each trial is initialised by one program for every seed, then stacked.
    state = programs.stack(*[programs.init_trial(
        train_step_lib.seed_key_data(t.records.config.seed),
        trial_setup.trial_hyperparameters(t.records.config)) for t in trials])
    step = 0
  else:
    state = programs.stack(*[t.records.restore(latest_step, programs.abstract_trial)
                             for t in trials])
    step = trials[0].records.step
    logging.info("Resumed from checkpoint at step %d.", step)
  # Every process must resume from the same step (a shared file system that
  # is not shared, say, would silently split the job).
  config = trials[0].records.config
  distributed.agree("resume", str(step), timeout_seconds=max(
      600.0, config.step_watchdog_seconds, config.watchdog_floor_seconds))
  return state, step
