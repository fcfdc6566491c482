"""Training loss that rises over a sustained stretch: usually a bug.

The playbook's FAQ: the training loss should go down; a training loss that
increases during training usually indicates a bug in the pipeline (or a
learning rate far past stable). The check looks at each feasible trial's
per-step training loss (grad_norms.jsonl; the per-log-interval means of
metrics.jsonl when it is absent), after the warmup and a first share of the
steps, as medians over windows: robust to single-step noise and spikes.

  stretch = loss_trend.rising_stretch(steps, losses, findings.Thresholds())
  stretch and (stretch.start_step, stretch.end_step, stretch.rise)
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from tuning_playbook.analysis import findings as findings_lib
from tuning_playbook.analysis.findings import Finding, fmt, trial_list
from tuning_playbook.analysis import study_data

WARNING = findings_lib.WARNING
MIN_POINTS = 20


@dataclasses.dataclass(frozen=True)
class RisingStretch:
  """A sustained rise of the windowed training loss."""
  start_step: int  # End of the lowest window before the rise.
  end_step: int  # End of the last raised window in a row.
  low: float  # Median loss of the lowest window before the rise.
  peak: float  # Highest window median within the stretch.
  threshold: float  # The rise a window needed to count as raised.
  noise: float  # Per-step noise deviation (robust).

  @property
  def rise(self) -> float:
    return self.peak - self.low


def step_noise(y: np.ndarray) -> float:
  """Per-step noise deviation: the MAD of first differences / (0.6745 sqrt 2)."""
  if len(y) < 3:
    return 0.0
  d = np.diff(y)
  return float(np.median(np.abs(d - np.median(d))) / (0.6745 * math.sqrt(2)))


def rising_stretch(steps: np.ndarray, losses: np.ndarray,
                   thresholds: findings_lib.Thresholds,
                   skip_steps: int = 0) -> RisingStretch | None:
  """The longest sustained rise of the loss after `skip_steps`, if any."""
  keep = np.isfinite(losses) & (steps > skip_steps)
  steps, y = steps[keep], losses[keep]
  if len(y):
    first = steps[0] + thresholds.loss_rise_skip * (steps[-1] - steps[0])
    steps, y = steps[steps >= first], y[steps >= first]
  if len(y) < MIN_POINTS:
    return None
  count = min(thresholds.loss_rise_windows, len(y) // 2)
  parts = np.array_split(np.arange(len(y)), count)
  medians = np.array([np.median(y[p]) for p in parts])
  ends = [int(steps[p[-1]]) for p in parts]
  width = min(len(p) for p in parts)
  noise = step_noise(y)
  # A window median deviates by ~1.25 noise / sqrt(width); a difference of
  # two of them by sqrt(2) times that.
  noise_floor = (thresholds.loss_rise_noise_multiple * 1.25 * math.sqrt(2)
                 * noise / math.sqrt(width))
  min_windows = max(2, math.ceil(thresholds.loss_rise_span * count))
  best, run_start = None, None
  for k in range(1, count):
    low_at = int(np.argmin(medians[:k]))
    low = float(medians[low_at])
    threshold = max(thresholds.loss_rise_level * abs(low),
                    thresholds.loss_rise_improvement * (medians[0] - low),
                    noise_floor)
    raised = medians[k] - low > threshold
    if raised and run_start is None:
      run_start = (k, low_at, low, threshold)
    if run_start is not None and (not raised or k == count - 1):
      last = k if raised else k - 1
      k0, at, low0, thr = run_start
      if last - k0 + 1 >= min_windows:
        stretch = RisingStretch(ends[at], ends[last], low0,
                                float(medians[k0:last + 1].max()), thr, noise)
        if best is None or stretch.end_step - stretch.start_step > (
            best.end_step - best.start_step):
          best = stretch
      run_start = None
  return best


def _warmup_steps(trial: study_data.Trial) -> int:
  optimizer = (trial.config or {}).get("optimizer") or {}
  warmup = optimizer.get("warmup_steps")
  return int(warmup) if isinstance(warmup, (int, float)) else 0


def check(study: study_data.Study,
          thresholds: findings_lib.Thresholds) -> list[Finding]:
  """One warning naming every feasible trial whose training loss rises."""
  rising = {}
  for trial in study.feasible_trials():
    steps, losses = trial.step_losses
    stretch = rising_stretch(steps, losses, thresholds, _warmup_steps(trial))
    if stretch is not None:
      rising[trial.trial_id] = stretch
  if not rising:
    return []
  where = "; ".join(f"{i}: {fmt(s.low)} at step {s.start_step} to "
                    f"{fmt(s.peak)} by step {s.end_step}"
                    for i, s in list(rising.items())[:6])
  return [Finding(
      "training_loss_increasing", "training_loss_increasing", WARNING,
      f"The training loss increases over a sustained stretch of training in "
      f"{trial_list(rising)} ({where}). A rising training loss usually "
      f"indicates a bug in the pipeline (data, loss, optimizer update or "
      f"schedule); if the learning rate is high, it can also be instability.",
      {"trials": {i: {**dataclasses.asdict(s), "rise": s.rise}
                  for i, s in rising.items()},
       "windows": thresholds.loss_rise_windows,
       "level": thresholds.loss_rise_level,
       "improvement": thresholds.loss_rise_improvement,
       "noise_multiple": thresholds.loss_rise_noise_multiple,
       "span": thresholds.loss_rise_span, "skip": thresholds.loss_rise_skip})]
