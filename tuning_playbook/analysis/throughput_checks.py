"""Input-bound trials: the training loop waited for its next batch too long.

Each log row of metrics.jsonl holds `perf/input_wait_fraction`, the share of
the interval the loop waited for input while the devices had nothing left to
run. A trial whose mean share exceeds its `input_bound_warning_fraction`
(`Thresholds.input_wait_fraction` when its config has none) is input-bound:
its accelerators idle, and its throughput says little about the model.

  wait = throughput_checks.input_wait(trial, thresholds)  # None: not logged
  findings = throughput_checks.check(study, thresholds)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tuning_playbook.analysis import findings as findings_lib
from tuning_playbook.analysis.findings import WARNING, Finding, percent, trial_list
from tuning_playbook.analysis import trial_data


@dataclasses.dataclass(frozen=True)
class InputWait:
  """A trial's input wait over its log intervals."""
  trial_id: str
  mean: float
  max: float
  intervals: int
  intervals_over_threshold: int
  threshold: float

  @property
  def input_bound(self) -> bool:
    return self.mean > self.threshold

  def text(self) -> str:
    return f"{percent(self.mean)} (max {percent(self.max)})"


def input_wait(trial: trial_data.Trial,
               thresholds: findings_lib.Thresholds) -> InputWait | None:
  fractions = trial.input_wait_fractions
  if not len(fractions):
    return None
  threshold = trial.input_bound_threshold or thresholds.input_wait_fraction
  return InputWait(trial.trial_id, float(np.mean(fractions)), float(np.max(fractions)),
                   len(fractions), int(np.sum(fractions > threshold)), threshold)


def check(study, thresholds: findings_lib.Thresholds) -> list[Finding]:
  """One warning naming the input-bound trials and their wait shares."""
  bound = [w for w in (input_wait(t, thresholds) for t in study.trials)
           if w is not None and w.input_bound]
  if not bound:
    return []
  bound.sort(key=lambda w: -w.mean)
  limits = sorted({w.threshold for w in bound})
  limit = " / ".join(percent(x) for x in limits)
  return [Finding(
      "input_bound", "input_bound", WARNING,
      f"Input-bound: {trial_list(f'{w.trial_id} ({w.text()})' for w in bound)} "
      f"waited for their next batch more than {limit} of the time on average, "
      f"with nothing left for the devices to run. Keep more batches in flight "
      f"(data.prefetch_batches), send several per transfer "
      f"(data.batches_per_transfer), keep the data in memory (data.cache), or "
      f"make the per-example preprocessing cheaper; their throughput (perf/*) "
      f"measures the input pipeline, not the model.",
      {"trials": {w.trial_id: dataclasses.asdict(w) for w in bound},
       "thresholds": limits})]
