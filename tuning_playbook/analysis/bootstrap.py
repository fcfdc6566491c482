"""Have we sampled enough? Bootstrapped best results at smaller trial budgets.

Resampling the finished trials with replacement simulates studies of fewer
trials (the playbook's Figure 3): wide boxes at the full budget mean a repeat
of the study could land somewhere quite different.

  result = bootstrap.best_of_budgets(values, [1, 2, 4, 8], samples=2000)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from tuning_playbook.analysis import findings as findings_lib
from tuning_playbook.analysis.findings import Finding, fmt, percent
from tuning_playbook.analysis import study_data

INFO, WARNING = findings_lib.INFO, findings_lib.WARNING
BUDGET_STEPS = (1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 25, 30, 40, 50, 60, 80, 100,
                150, 200, 300, 500, 1000)


@dataclasses.dataclass(frozen=True)
class BootstrapResult:
  """Best lower-is-better objective of simulated studies, per budget."""
  budgets: tuple[int, ...]
  best: dict[int, np.ndarray]  # NaN where every sampled trial was infeasible.

  def quartiles(self, budget: int) -> tuple[float, float, float]:
    x = self.best[budget]
    x = x[np.isfinite(x)]
    if not len(x):
      return (float("nan"),) * 3
    q1, q2, q3 = np.percentile(x, [25, 50, 75])
    return float(q1), float(q2), float(q3)


def budgets(num_trials: int) -> list[int]:
  """Trial budgets up to and including `num_trials`."""
  out = [b for b in BUDGET_STEPS if b < num_trials]
  return out + [num_trials] if num_trials > 0 else []


def best_of_budgets(values: Sequence[float], budget_list: Sequence[int],
                    samples: int, seed: int = 0) -> BootstrapResult:
  """Resamples `values` (lower is better, +inf: infeasible) at each budget."""
  x = np.asarray(values, dtype=np.float64)
  rng = np.random.default_rng(seed)
  best = {}
  for b in budget_list:
    draws = x[rng.integers(0, len(x), size=(samples, b))].min(axis=1)
    best[b] = np.where(np.isfinite(draws), draws, np.nan)
  return BootstrapResult(tuple(budget_list), best)


def study_values(study: study_data.Study) -> np.ndarray:
  """Lower-is-better objective of every finished trial; +inf if infeasible."""
  finished = [t for t in study.trials if t.status != study_data.UNFINISHED]
  return np.array([float(study.objective.loss_like(t.best_value)) if t.feasible
                   else np.inf for t in finished])


def run(study: study_data.Study,
        thresholds: findings_lib.Thresholds) -> BootstrapResult | None:
  values = study_values(study)
  if not np.isfinite(values).any():
    return None
  return best_of_budgets(values, budgets(len(values)), thresholds.bootstrap_samples)


def check(study: study_data.Study, result: BootstrapResult | None,
          thresholds: findings_lib.Thresholds) -> list[Finding]:
  """Whether a repeat study of the same budget would likely reach the good region."""
  if result is None:
    return []
  values = study_values(study)
  n = len(values)
  feasible = values[np.isfinite(values)]
  best, median = float(feasible.min()), float(np.median(feasible))
  tolerance = thresholds.good_region * (median - best)
  good = int(np.sum(values <= best + tolerance))
  miss = (1 - good / n) ** n  # Exact for resampling n trials with replacement.
  per_budget = {b: dict(zip(("q1", "median", "q3"), result.quartiles(b)))
                for b in result.budgets}
  sign = 1 if study.objective.mode == "min" else -1
  details = {"num_trials": n, "good_trials": good, "tolerance": tolerance,
             "good_threshold": sign * (best + tolerance),
             "miss_probability": miss,
             "miss_probability_threshold": thresholds.miss_probability,
             "quartiles_by_budget": {b: {k: sign * v for k, v in q.items()}
                                     for b, q in per_budget.items()}}
  q1, _, q3 = result.quartiles(n)
  where = (f"{good} of {n} trials reach the good region (within "
           f"{fmt(tolerance)} of the best {study.objective.metric}, "
           f"{percent(thresholds.good_region)} of the way to the median trial)")
  spread = f"the interquartile range of the best result at {n} trials is {fmt(q3 - q1)}"
  if miss > thresholds.miss_probability:
    return [Finding(
        "not_enough_trials", "not_enough_trials", WARNING,
        f"Probably not sampled enough: {where}, so a repeat study of {n} trials "
        f"would miss it with probability {percent(miss)}; {spread}. Run more "
        f"trials, or be less ambitious (narrow the search space, fewer nuisance "
        f"hyperparameters).", details)]
  return [Finding(
      "sampling", "sampling", INFO,
      f"{where}: a repeat study of {n} trials would miss it with "
      f"probability {percent(miss)}; {spread}.", details)]
