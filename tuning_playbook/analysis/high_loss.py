"""Infeasible-like trials: finished, but with an uncharacteristically high loss.

The playbook (Figure 7a) counts as infeasible a trial that "either produces
NaNs or uncharacteristically high values of the loss". Divergence to NaN or
past `divergence_loss_threshold` ends a run as diverged; this check names the
finished trials whose final training loss stands far above the rest of the
study: at least `high_loss_factor` x the median final loss, and
`high_loss_deviations` robust deviations (1.4826 x the median absolute
deviation of log loss) above it.

  found = high_loss.check(study, findings.Thresholds())
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tuning_playbook.analysis import findings as findings_lib

LOSS = "train/loss"
KIND = "infeasible_like"


def final_loss(trial: Any) -> float | None:
  """The last finite training loss of metrics.jsonl, or None."""
  _, values = trial.series(LOSS)
  finite = [float(v) for v in values if math.isfinite(v) and v > 0]
  return finite[-1] if finite else None


def outliers(losses: dict[str, float], thresholds: findings_lib.Thresholds
             ) -> dict[str, float]:
  """{trial_id: robust deviations above the median} of the too-high ones."""
  if len(losses) < thresholds.high_loss_min_trials:
    return {}
  logs = np.log(np.asarray(list(losses.values())))
  median = float(np.median(logs))
  spread = 1.4826 * float(np.median(np.abs(logs - median)))
  out = {}
  for trial_id, loss in losses.items():
    above = math.log(loss) - median
    if above < math.log(thresholds.high_loss_factor):
      continue
    deviations = above / spread if spread > 0 else math.inf
    if deviations >= thresholds.high_loss_deviations:
      out[trial_id] = deviations
  return out


def check(study: Any, thresholds: findings_lib.Thresholds) -> list[findings_lib.Finding]:
  """One warning naming the infeasible-like trials of a study_data.Study."""
  losses = {t.trial_id: loss for t in study.feasible_trials()
            if (loss := final_loss(t)) is not None}
  high = outliers(losses, thresholds)
  if not high:
    return []
  median = float(np.exp(np.median(np.log(list(losses.values())))))
  where = "; ".join(f"{i}: {findings_lib.fmt(losses[i])}" for i in list(high)[:6])
  return [findings_lib.Finding(
      KIND, KIND, findings_lib.WARNING,
      f"Trial(s) {findings_lib.trial_list(high)} finished with an uncharacteristically "
      f"high training loss ({where}; the median of {len(losses)} feasible "
      f"trials is {findings_lib.fmt(median)}): the playbook counts such trials "
      f"as infeasible (Figure 7a), like those that diverge. Read the plots "
      f"with them as infeasible; if they share a region of the search space, "
      f"narrow it or check it for instability.",
      {"trials": {i: {"final_loss": losses[i], "deviations": high[i]}
                  for i in high},
       "median_final_loss": median, "num_feasible": len(losses),
       "factor": thresholds.high_loss_factor,
       "deviations": thresholds.high_loss_deviations})]
