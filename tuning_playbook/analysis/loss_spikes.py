"""Loss spikes and stalls in a per-step training loss: signs of instability.

From the playbook's "Identifying unstable workloads": learning rates above
the best show instability as the loss going up, not down, during periods of
training, early (at initialization) or suddenly in the middle.

A step is a spike when its loss exceeds both `spike_factor` x the lowest
median of `spike_window` consecutive steps so far and the median of the
`spike_window` steps before it by `spike_jump` x that median plus
`noise_multiple` deviations of those steps (so minibatch noise alone does not
count). Within the first window (instability at initialization), from the
second step on, the steps so far stand in for the window before it, and the
loss must exceed `spike_factor` x the highest of them (in place of the lowest
window median). Spike steps at most a window apart are one spike. A run
whose loss ends no lower than it started (within `STALL_FRACTION`; the
medians of the first and last windows, or of its halves when shorter than two
windows) stalled; a sustained rise (loss_trend.rising_stretch) is the slower
kind of instability.

  result = loss_spikes.examine(steps, losses, findings.Thresholds())
  result.unstable, [(s.step, s.peak, s.size) for s in result.spikes]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from tuning_playbook.analysis import findings as findings_lib
from tuning_playbook.analysis import loss_trend

STALL_FRACTION = 0.05
MIN_EARLY_STEPS = 1  # Steps before the first one examined for a spike.


@dataclasses.dataclass(frozen=True)
class Spike:
  """One spike: its first step, highest loss and size over the reference."""
  step: int
  last_step: int
  peak: float
  reference: float  # Median of the window (or the steps so far) before it.
  size: float  # peak / reference (inf over a zero reference).


@dataclasses.dataclass(frozen=True)
class LossStability:
  """What one run's per-step training loss shows."""
  num_steps: int
  spikes: tuple[Spike, ...]
  first_nonfinite_step: int | None  # NaN/Inf loss: diverged there.
  stalled: bool  # The loss ended no lower than it started.
  first_loss: float | None
  final_loss: float | None  # Median of the last window (or half).
  rising: loss_trend.RisingStretch | None = None  # A sustained rise.

  @property
  def unstable(self) -> bool:
    return (bool(self.spikes) or self.first_nonfinite_step is not None
            or self.stalled or self.rising is not None)

  def to_json(self) -> dict[str, Any]:
    return {"num_steps": self.num_steps, "unstable": self.unstable,
            "spikes": [dataclasses.asdict(s) for s in self.spikes],
            "first_nonfinite_step": self.first_nonfinite_step,
            "stalled": self.stalled, "first_loss": self.first_loss,
            "final_loss": self.final_loss,
            "rising": (None if self.rising is None else
                       {**dataclasses.asdict(self.rising),
                        "rise": self.rising.rise})}


def _robust_std(x: np.ndarray) -> float:
  return float(1.4826 * np.median(np.abs(x - np.median(x))))


def examine(steps: np.ndarray, losses: np.ndarray,
            thresholds: findings_lib.Thresholds,
            diverged_step: int | None = None) -> LossStability:
  """Spikes, divergence and stalling of one run's per-step training loss."""
  steps = np.asarray(steps, dtype=np.int64)
  losses = np.asarray(losses, dtype=np.float64)
  bad = np.flatnonzero(~np.isfinite(losses))
  nonfinite = int(steps[bad[0]]) if len(bad) else diverged_step
  end = bad[0] if len(bad) else len(losses)
  steps, y = steps[:end], losses[:end]
  w = max(2, thresholds.spike_window)
  spike_steps = []
  lowest = np.inf
  for i in range(MIN_EARLY_STEPS, len(y)):
    before = y[max(0, i - w):i]
    reference = float(np.median(before))
    if i >= w:
      lowest = min(lowest, reference)
      above = y[i] > thresholds.spike_factor * lowest
    else:  # Early: no whole window yet.
      above = y[i] > thresholds.spike_factor * before.max()
    jump = (thresholds.spike_jump * reference
            + thresholds.noise_multiple * _robust_std(before))
    if above and y[i] - reference > jump:
      spike_steps.append((i, reference))
  spikes = []
  for i, reference in spike_steps:
    if spikes and i - spikes[-1][1] <= w:
      first, _, ref, peak = spikes[-1]
      spikes[-1] = (first, i, ref, max(peak, float(y[i])))
    else:
      spikes.append((i, i, reference, float(y[i])))
  half = min(w, len(y) // 2)  # First and last windows do not overlap.
  first = float(np.median(y[:half])) if len(y) >= w else None
  final = float(np.median(y[-half:])) if len(y) >= w else None
  stalled = (nonfinite is None and first is not None
             and final >= (1 - STALL_FRACTION) * first)
  return LossStability(
      num_steps=len(losses),
      spikes=tuple(Spike(int(steps[a]), int(steps[b]), peak, ref,
                         peak / ref if ref else math.inf)
                   for a, b, ref, peak in spikes),
      first_nonfinite_step=nonfinite, stalled=bool(stalled),
      first_loss=first, final_loss=final,
      rising=loss_trend.rising_stretch(steps, y, thresholds))


def reported_spike_size(losses: np.ndarray,
                        thresholds: findings_lib.Thresholds) -> float:
  """The smallest spike an ordinary study's report names for this loss:
  `report_spike_size`, or more where the loss is noisy."""
  y = np.asarray(losses, dtype=np.float64)
  y = y[np.isfinite(y) & (y > 0)]
  noise = _robust_std(np.diff(np.log(y))) / math.sqrt(2) if len(y) > 2 else 0.0
  return max(thresholds.report_spike_size,
             math.exp(thresholds.report_spike_noise_multiple * noise))


def check(study: Any, thresholds: findings_lib.Thresholds) -> list[findings_lib.Finding]:
  """One warning naming every feasible trial of the study (a
  study_data.Study) whose per-step training loss spikes: instability in an
  ordinary study, not only in the playbook's instability procedures."""
  spiky = {}
  for trial in study.feasible_trials():
    steps, losses = trial.step_losses
    if len(steps):
      least = reported_spike_size(losses, thresholds)
      spikes = [s for s in examine(steps, losses, thresholds).spikes
                if s.size >= least]
      if spikes:
        spiky[trial.trial_id] = spikes
  if not spiky:
    return []
  where = "; ".join(
      f"{i}: {len(s)} spike(s), the largest {findings_lib.fmt(max(x.size for x in s))}x "
      f"at step {max(s, key=lambda x: x.size).step}"
      for i, s in list(spiky.items())[:6])
  return [findings_lib.Finding(
      "loss_spikes", "loss_spikes", findings_lib.WARNING,
      f"The training loss spikes in {findings_lib.trial_list(spiky)} ({where}): "
      f"a sign of training instability (the playbook's \"Identifying unstable "
      f"workloads\"), even in trials that finished. Check where the learning "
      f"rate becomes unstable; warmup or gradient clipping may make higher "
      f"rates usable.",
      {"trials": {i: [dataclasses.asdict(x) for x in s] for i, s in spiky.items()},
       "window": thresholds.spike_window, "factor": thresholds.spike_factor,
       "min_size": thresholds.report_spike_size,
       "noise_multiple": thresholds.report_spike_noise_multiple})]
