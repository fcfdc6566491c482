"""Checks on training curves, from the playbook's "Examining the training curves".

Each feasible trial's validation objective (and the same metric on the fixed
training subset) is examined for problematic overfitting, high step-to-step
variance late in training, still improving at the end, and saturating long
before the end. Curves are made lower-is-better first.

  flags = curve_checks.examine(trial, study.objective, findings.Thresholds())
  print(flags.names())  # e.g. ["overfitting", "still_improving"]
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from tuning_playbook.analysis import findings as findings_lib
from tuning_playbook.analysis.findings import Finding, percent, trial_list
from tuning_playbook.analysis import study_data

INFO, WARNING = findings_lib.INFO, findings_lib.WARNING
LATE_FRACTION = 0.25
MIN_LATE_POINTS = 4
REGULARIZERS = ("decay", "dropout", "smoothing", "regulari", "augment")
SPLIT_NAMES = {"train": "training subset", "validation": "validation"}


@dataclasses.dataclass(frozen=True)
class CurveFlags:
  """What the curves of one trial show; each flag is None or its evidence."""
  trial_id: str
  examined: bool = False  # False: too few evaluations to judge.
  overfitting: dict[str, Any] | None = None
  late_variance: dict[str, Any] | None = None
  still_improving: dict[str, Any] | None = None
  saturated: dict[str, Any] | None = None

  def names(self) -> list[str]:
    return [f.name for f in dataclasses.fields(self)
            if f.name not in ("trial_id", "examined")
            and getattr(self, f.name) is not None]


def _lower_is_better(trial: study_data.Trial, key: str,
                     objective: study_data.Objective) -> tuple[np.ndarray, np.ndarray]:
  steps, values = trial.series(key)
  y = objective.loss_like(values)
  keep = np.isfinite(y)
  return steps[keep], y[keep]


def late_window(y: np.ndarray) -> np.ndarray:
  n = max(MIN_LATE_POINTS, math.ceil(LATE_FRACTION * len(y)))
  return y[-n:]


def noise(y: np.ndarray) -> float:
  """Step-to-step noise, from second differences (blind to a local linear trend)."""
  if len(y) < 3:
    return 0.0
  return float(np.std(np.diff(y, n=2)) / math.sqrt(6))


def late_noise(y: np.ndarray) -> float:
  """Step-to-step noise over the last quarter of the evaluations."""
  return noise(late_window(y))


def improvement(y: np.ndarray) -> float:
  """From the worst value before the best to the best."""
  b = int(np.argmin(y))
  return float(np.max(y[:b + 1]) - y[b])


def smoothed(y: np.ndarray) -> tuple[np.ndarray, int]:
  """Moving average over up to 5 evaluations (one fifth of them), and its width."""
  w = min(5, max(1, len(y) // 5))
  return np.convolve(y, np.ones(w) / w, mode="valid"), w


def overfitting(steps: np.ndarray, y: np.ndarray,
                thresholds: findings_lib.Thresholds) -> dict[str, Any] | None:
  """The smoothed curve rises after its best, beyond noise and a share of its improvement."""
  if len(y) < 4:
    return None
  ma, w = smoothed(y)
  b = int(np.argmin(ma))
  if len(ma) - b < 3:
    return None
  rise = float(ma[-1] - ma[b])
  scale, deviation = improvement(y), noise(y[b:])
  # The difference of two averages of w noisy values deviates by noise*sqrt(2/w).
  noise_floor = thresholds.noise_multiple * deviation * math.sqrt(2 / w)
  if rise <= max(thresholds.overfit_rise * scale, noise_floor):
    return None
  return {"best_step": int(steps[int(np.argmin(y))]), "final_step": int(steps[-1]),
          "rise": rise, "rise_fraction_of_improvement": rise / scale if scale else None,
          "noise": deviation}


def relative_late_noise(y: np.ndarray) -> float:
  late = late_window(y)
  level = max(abs(float(np.median(late))), 0.05 * float(np.ptp(y)), 1e-12)
  return late_noise(y) / level


def still_improving(steps: np.ndarray, y: np.ndarray,
                    thresholds: findings_lib.Thresholds) -> dict[str, Any] | None:
  """The best-so-far still improves meaningfully in the last 25% of training."""
  if len(y) < 3:
    return None
  cut = (1 - LATE_FRACTION) * steps[-1]
  before, after = y[steps < cut], y[steps >= cut]
  if not len(before) or not len(after):
    return None
  gain, scale = float(np.min(before) - np.min(after)), improvement(y)
  if scale <= 0 or gain <= max(thresholds.still_improving * scale, 2 * late_noise(y)):
    return None
  return {"gain_in_last_quarter": gain, "fraction_of_improvement": gain / scale,
          "from_step": int(cut)}


def saturation_step(steps: np.ndarray, y: np.ndarray,
                    thresholds: findings_lib.Thresholds) -> int:
  """First step (end of a smoothing window) within tolerance of the best."""
  ma, w = smoothed(y)
  tolerance = max(thresholds.saturation_tolerance * improvement(y),
                  2 * late_noise(y) / math.sqrt(w))
  return int(steps[w - 1:][np.argmax(ma <= np.min(ma) + tolerance)])


def examine(trial: study_data.Trial, objective: study_data.Objective,
            thresholds: findings_lib.Thresholds) -> CurveFlags:
  """The curve flags of one trial (all None when it has too few evaluations)."""
  steps, y = _lower_is_better(trial, objective.metric, objective)
  if len(y) < 3:
    return CurveFlags(trial.trial_id)
  split = objective.split_metric[0]
  train = (_lower_is_better(trial, objective.on_split("train"), objective)
           if split != "train" else (np.array([]), np.array([])))
  over = overfitting(steps, y, thresholds)
  variance = {}
  for name, (s, curve) in (("validation", (steps, y)), ("train", train)):
    if len(curve) >= MIN_LATE_POINTS:
      rel = relative_late_noise(curve)
      if rel > thresholds.late_noise:
        variance[name] = rel
  saturated = None
  if over is None and improvement(y) > 0:
    final = int(steps[-1])
    sat = {split: saturation_step(steps, y, thresholds)}
    if len(train[1]) >= 3 and improvement(train[1]) > 0:
      sat["train"] = saturation_step(*train, thresholds)
    if final > 0 and all(s <= thresholds.saturation_fraction * final
                         for s in sat.values()):
      saturated = {"saturation_steps": sat, "final_step": final,
                   "fraction": max(sat.values()) / final}
  return CurveFlags(
      trial.trial_id, examined=True, overfitting=over,
      late_variance={"relative_noise": variance} if variance else None,
      still_improving=still_improving(steps, y, thresholds), saturated=saturated)


def examine_all(study: study_data.Study,
                thresholds: findings_lib.Thresholds) -> dict[str, CurveFlags]:
  """Curve flags of every feasible trial, by trial id."""
  return {t.trial_id: examine(t, study.objective, thresholds)
          for t in study.feasible_trials()}


def _overfitting(study: study_data.Study, over_best: dict[str, Any],
                 over_any: dict[str, Any],
                 thresholds: findings_lib.Thresholds) -> Finding:
  """The overfitting finding: a warning when best trials overfit."""
  metric = study.objective.metric
  regularization = [d.name for d in study.scientific_dimensions()
                    if any(r in d.name.lower() for r in REGULARIZERS)]
  if over_best:
    message = (
        f"Problematic overfitting: {metric} starts rising after its best step "
        f"in {len(over_best)} of the best trials ({trial_list(over_best)}). "
        f"Re-run with more regularization (dropout, label smoothing, weight "
        f"decay) or better-tuned regularization before "
        + ("comparing scientific values." if study.scientific_dimensions()
           else "drawing conclusions from this study."))
    if regularization:
      message += (f" Expected for weak settings of {', '.join(regularization)}, "
                  f"which are scientific hyperparameters here.")
  else:
    message = (
        f"{metric} rises after its best step in {len(over_any)} trial(s) that "
        f"are not among the best ({trial_list(over_any)}). Selecting the best "
        f"trial favours configurations that regularize more (even by hobbling "
        f"optimization, e.g. a small learning rate): keep this in mind.")
  return Finding("overfitting", "overfitting", WARNING if over_best else INFO,
                 message,
                 {"best_trials": over_best, "all_trials": over_any,
                  "rise_threshold": thresholds.overfit_rise,
                  "noise_multiple": thresholds.noise_multiple})


def check(study: study_data.Study, flags: dict[str, CurveFlags],
          best_ids: Sequence[str],
          thresholds: findings_lib.Thresholds) -> list[Finding]:
  """Findings from the curves of the best trials (overfitting: of any trial)."""
  metric = study.objective.metric
  best_ids = [i for i in best_ids if i in flags]
  def flagged(name, ids):
    return {i: getattr(flags[i], name) for i in ids if getattr(flags[i], name)}
  out = []
  over_best = flagged("overfitting", best_ids)
  over_any = flagged("overfitting", flags)
  if over_any:
    out.append(_overfitting(study, over_best, over_any, thresholds))
  variance = flagged("late_variance", best_ids)
  if variance:
    where = "; ".join(
        f"{i}: " + ", ".join(f"{SPLIT_NAMES.get(split, split)} {percent(v)}"
                             for split, v in e["relative_noise"].items())
        for i, e in list(variance.items())[:6])
    out.append(Finding(
        "late_variance", "late_variance", WARNING,
        f"High step-to-step variance of {study.objective.split_metric[1]} late in "
        f"training ({where} of the metric's level; threshold "
        f"{percent(thresholds.late_noise)}): each trial ends on a "
        f"lucky or unlucky step, which blurs comparisons and reproduction. "
        f"Increase the batch size, use more validation data, decay the learning "
        f"rate further, or use Polyak averaging.",
        {"trials": variance, "threshold": thresholds.late_noise}))
  improving = flagged("still_improving", best_ids)
  if improving:
    out.append(Finding(
        "still_improving", "still_improving", WARNING,
        f"{trial_list(improving)} still improved {metric} in the last 25% of "
        f"training (by more than {percent(thresholds.still_improving)} of their "
        f"total improvement): training looks compute-bound. Increase "
        f"max_train_steps or change the learning rate schedule.",
        {"trials": improving, "threshold": thresholds.still_improving}))
  saturated = flagged("saturated", best_ids)
  if saturated:
    latest = max(v["fraction"] for v in saturated.values())
    out.append(Finding(
        "saturated", "saturated", WARNING,
        f"{trial_list(saturated)} reached their best training and validation "
        f"performance by {percent(latest)} of training and gained nothing after: "
        f"training is not compute-bound, so max_train_steps could be lowered "
        f"(see the best-step check).",
        {"trials": saturated, "tolerance": thresholds.saturation_tolerance,
         "fraction": thresholds.saturation_fraction}))
  examined = [i for i in best_ids if flags[i].examined]
  if len(examined) < len(best_ids):
    out.append(Finding(
        "curves_missing", "curves_missing", INFO,
        f"{trial_list([i for i in best_ids if i not in examined])} logged fewer "
        f"than 3 evaluations of {metric}: too few to judge their training "
        f"curves. Evaluate more often (eval_every_steps) to see them.",
        {"trials": [i for i in best_ids if i not in examined]}))
  if examined and not out:
    out.append(Finding(
        "curves_ok", "curves_ok", INFO,
        f"The training curves of the best trials ({trial_list(examined)}) show no "
        f"overfitting, late variance, saturation, or improvement left at the end.",
        {"trials": examined}))
  return out
