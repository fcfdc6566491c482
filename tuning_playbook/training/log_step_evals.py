"""The evals of one log step: each due trial alone, or a population at once.

A trial evaluated alone runs the single-trial eval program on its slice of
the stacked state; when several trials are due together and a population
evaluator exists, one vmapped eval scores them all, the first time any of
them asks. With an exponential moving average (`ema_decay > 0`) each eval
also scores the averaged parameters as `eval_ema/...`.

  evaluate = LogStepEvals(programs, state, hyperparams, host_hyperparams,
                          num_trials=n, num_due=len(fetch.evals),
                          ema=config.ema_decay > 0)
  metrics, trial_state = evaluate(i)  # The state to checkpoint beside them.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from tuning_playbook.training import train_step as train_step_lib
from tuning_playbook.training import trial_setup


def trial_values(host_hyperparams: Mapping[str, np.ndarray],
                 i: int) -> dict[str, np.float32]:
  """Trial i's values of the traced hyperparameters."""
  return {k: v[i] for k, v in host_hyperparams.items()}


class LogStepEvals:
  """`evaluate(i) -> (eval metrics, trial i's state)` for the due trials."""

  def __init__(self, programs: trial_setup.Programs, state: Any, hyperparams: Any,
               host_hyperparams: Mapping[str, np.ndarray], *, num_trials: int,
               num_due: int, ema: bool):
    self._programs, self._state, self._hyperparams = programs, state, hyperparams
    self._host_hyperparams, self._num_trials = host_hyperparams, num_trials
    self._alone = num_due == 1 or programs.population_evaluator is None
    self._ema = ema
    self._evaluated: list[dict[str, float]] = []

  def __call__(self, i: int) -> tuple[dict[str, float], Any]:
    programs = self._programs
    state = programs.take_trial(self._state, i)
    if self._alone:
      hyperparams = trial_values(self._host_hyperparams, i)
      evaluator = programs.trial_evaluator
      metrics = evaluator.evaluate((state, hyperparams))
      if self._ema:
        metrics.update(evaluator.evaluate(
            (train_step_lib.ema_state(state), hyperparams), prefix="eval_ema"))
      return metrics, state
    if not self._evaluated:
      self._evaluate_population()
    return self._evaluated[i], state

  def _evaluate_population(self) -> None:
    evaluator = self._programs.population_evaluator
    num_trials = self._num_trials
    self._evaluated.extend(evaluator.evaluate_population(
        (self._state, self._hyperparams), num_trials))
    if self._ema:
      for metrics, ema_metrics in zip(self._evaluated, evaluator.evaluate_population(
          (train_step_lib.ema_state(self._state), self._hyperparams),
          num_trials, prefix="eval_ema")):
        metrics.update(ema_metrics)
