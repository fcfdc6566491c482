"""Gradient norms and clipping, from the playbook's "Gradient clipping".

The suggested clipping threshold is the 90th percentile of the unclipped
gradient norm over all steps; clipping more than half of the steps is
"extremely aggressive" (a strange way of lowering the learning rate).

  stats = gradient_checks.stats(trial, findings.Thresholds())
  print(stats.suggested_threshold, stats.fraction_clipped_at_suggestion)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from tuning_playbook.analysis import findings as findings_lib
from tuning_playbook.analysis.findings import Finding, fmt, percent, trial_list
from tuning_playbook.analysis import study_data
from tuning_playbook.common import records

INFO, WARNING = findings_lib.INFO, findings_lib.WARNING
MAX_LISTED_STEPS = 10


@dataclasses.dataclass(frozen=True)
class GradientStats:
  """Summary of one trial's unclipped gradient norms."""
  trial_id: str
  num_steps: int
  median: float
  maximum: float
  suggested_threshold: float  # The clip_percentile-th percentile.
  fraction_clipped_at_suggestion: float
  configured_threshold: float  # config.grad_clip_norm; 0 means off.
  fraction_clipped_configured: float | None
  # Norm above gradient_outlier_factor x the median of its neighbourhood.
  outlier_steps: tuple[int, ...]
  step_resolution: bool  # False: per-log-interval means from metrics.jsonl.


def local_median(norms: np.ndarray, blocks: int = 100, min_block: int = 10) -> np.ndarray:
  """Each step's baseline: the median norm of its block of ~1% of the steps.

  A spike stands out from its neighbours; a norm that falls steadily over
  training (as the loss goes to zero) does not.
  """
  size = max(min_block, len(norms) // blocks)
  starts = np.arange(0, len(norms), size)
  medians = np.array([np.median(norms[i:i + size]) for i in starts])
  if len(norms) - starts[-1] < min_block and len(starts) > 1:
    medians[-1] = np.median(norms[starts[-2]:])  # Too short to stand alone.
  return np.repeat(medians, size)[:len(norms)]


def stats(trial: study_data.Trial,
          thresholds: findings_lib.Thresholds) -> GradientStats | None:
  """Gradient-norm statistics of a trial, or None if it logged none."""
  steps, norms = trial.grad_norms
  keep = np.isfinite(norms)
  steps, norms = steps[keep], norms[keep]
  if not len(norms):
    return None
  from_step_log = records.GRAD_NORMS_FILE in trial.present_files
  threshold = float(np.percentile(norms, thresholds.clip_percentile))
  median = float(np.median(norms))
  configured = trial.grad_clip_norm
  clipped = None
  if configured > 0:
    clipped = float(np.mean(norms > configured))
    logged = trial.series("train/clipped_fraction")[1]
    if not from_step_log and np.isfinite(logged).any():
      clipped = float(np.nanmean(logged))
  outliers = steps[norms > thresholds.gradient_outlier_factor * local_median(norms)]
  return GradientStats(
      trial_id=trial.trial_id, num_steps=len(norms), median=median,
      maximum=float(norms.max()), suggested_threshold=threshold,
      fraction_clipped_at_suggestion=float(np.mean(norms > threshold)),
      configured_threshold=configured, fraction_clipped_configured=clipped,
      outlier_steps=tuple(int(s) for s in outliers), step_resolution=from_step_log)


def check(all_stats: Sequence[GradientStats],
          thresholds: findings_lib.Thresholds) -> list[Finding]:
  """Clipping suggestion, aggressive clipping and gradient spikes (best first)."""
  if not all_stats:
    return []
  best = all_stats[0]
  per_trial = {s.trial_id: dataclasses.asdict(s) for s in all_stats}
  q = f"{thresholds.clip_percentile:g}th percentile"
  out = [Finding(
      "clipping_threshold", "clipping_threshold", INFO,
      f"If training needs gradient clipping, start from grad_clip_norm = "
      f"{fmt(best.suggested_threshold)}: the {q} of the unclipped gradient norm "
      f"of the best trial ({best.trial_id}, {best.num_steps} "
      f"{'steps' if best.step_resolution else 'logged intervals'}). It would clip "
      f"{percent(best.fraction_clipped_at_suggestion)} of its steps; tune it from "
      f"there if instability remains.",
      {"suggested_threshold": best.suggested_threshold,
       "fraction_clipped": best.fraction_clipped_at_suggestion,
       "percentile": thresholds.clip_percentile, "trial": best.trial_id,
       "trials": per_trial})]
  aggressive = {s.trial_id: s.fraction_clipped_configured for s in all_stats
                if s.fraction_clipped_configured is not None
                and s.fraction_clipped_configured > thresholds.aggressive_clip_fraction}
  if aggressive:
    worst = max(aggressive.values())
    out.append(Finding(
        "aggressive_clipping", "aggressive_clipping", WARNING,
        f"Extremely aggressive gradient clipping in {trial_list(aggressive)}: up "
        f"to {percent(worst)} of steps had a gradient norm above grad_clip_norm "
        f"(more than {percent(thresholds.aggressive_clip_fraction)}). That mostly "
        f"lowers the effective learning rate: reduce the learning rate instead, "
        f"and clip near the {q} of the gradient norm "
        f"({fmt(best.suggested_threshold)} for {best.trial_id}).",
        {"trials": aggressive, "threshold": thresholds.aggressive_clip_fraction,
         "configured": {s.trial_id: s.configured_threshold for s in all_stats}}))
  spiky = {s.trial_id: list(s.outlier_steps[:MAX_LISTED_STEPS])
           for s in all_stats if s.outlier_steps}
  if spiky:
    out.append(Finding(
        "gradient_outliers", "gradient_outliers", WARNING,
        f"Gradient norm spikes (above {fmt(thresholds.gradient_outlier_factor)}x "
        f"the median norm of the surrounding steps) in {trial_list(spiky)}: outlier "
        f"gradients are where clipping helps. Clip near the {q} "
        f"({fmt(best.suggested_threshold)}), or for spikes early in training "
        f"try a longer learning rate warmup.",
        {"trials": spiky, "factor": thresholds.gradient_outlier_factor}))
  return out
