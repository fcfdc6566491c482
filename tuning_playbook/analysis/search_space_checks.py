"""Search-space checks: boundaries, infeasible trials, and how long to train.

From the playbook's "Identifying bad search space boundaries", "Extracting
insight from experimental results" and "Deciding how long to train when
training is not compute-bound".

  for finding in search_space_checks.check(study, findings.Thresholds()):
    print(finding.message)
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from tuning_playbook.analysis import findings as findings_lib
from tuning_playbook.analysis import isolation
from tuning_playbook.analysis import study_data
from tuning_playbook.analysis.findings import Finding, fmt, percent, trial_list

INFO, WARNING = findings_lib.INFO, findings_lib.WARNING


def check(study: study_data.Study,
          thresholds: findings_lib.Thresholds) -> list[Finding]:
  """Every search-space finding for the study."""
  return (unfinished_trials(study) + record_problems(study)
          + near_boundary(study, thresholds)
          + infeasible_trials(study, thresholds)
          + best_step_fraction(study, thresholds))


def _bounded(study: study_data.Study,
             dim: study_data.Dimension) -> study_data.Dimension:
  return isolation.with_observed_bounds(
      dim, [t.params.get(dim.name) for t in study.trials])


def near_boundary(study: study_data.Study,
                  thresholds: findings_lib.Thresholds) -> list[Finding]:
  """The best trial lies near the edge of a numeric dimension."""
  best = study.best_trial()
  if best is None:
    return []
  out = []
  margin = thresholds.boundary_margin
  for dim in study.varied_dimensions():
    dim = _bounded(study, dim)
    position = dim.position(best.params.get(dim.name))
    if position is None:
      continue
    if position <= margin:
      side, bound, word, beyond_test = "min", dim.min, "below", lambda p: p < position
    elif position >= 1 - margin:
      side, bound, word, beyond_test = "max", dim.max, "above", lambda p: p > position
    else:
      continue
    beyond = []
    for trial in study.trials:
      p = dim.position(trial.params.get(dim.name))
      if trial.status != study_data.UNFINISHED and p is not None and beyond_test(p):
        beyond.append(trial)
    infeasible_beyond = bool(beyond) and all(t.infeasible for t in beyond)
    suggested = dim.value_at(-0.5 if side == "min" else 1.5)
    if dim.scale == "linear" and side == "min" and float(dim.min) >= 0:
      suggested = max(suggested, 0.0)
    value = best.params.get(dim.name)
    message = (
        f"The best trial ({best.trial_id}) has {dim.name} = {fmt(value)}, in the "
        f"outer {percent(margin)} of the search range [{fmt(dim.min)}, "
        f"{fmt(dim.max)}] ({dim.scale} scale), next to its {side} boundary. "
        f"Better trials may lie {word} {fmt(bound)}: extend the range {word} "
        f"{fmt(bound)} (e.g. to {fmt(suggested)}) and run another study.")
    if infeasible_beyond:
      message += (
          f" Every trial {word} it ({len(beyond)}) was infeasible: the model may be "
          f"unstable there, so first try the fixes for training instability "
          f"(warmup, gradient clipping) that could make {word} values usable.")
    out.append(Finding(
        id=f"near_boundary/{dim.name}/{side}", kind="near_boundary",
        severity=WARNING, message=message,
        details={"dimension": dim.name, "side": side, "role": dim.role,
                 "scale": dim.scale, "value": value, "bound": bound,
                 "position": position, "margin": margin,
                 "best_trial": best.trial_id, "suggested_bound": suggested,
                 "trials_beyond": [t.trial_id for t in beyond],
                 "infeasible_beyond": infeasible_beyond}))
  return out


def _where_infeasible(study: study_data.Study) -> list[dict[str, Any]]:
  """Dimensions whose value separates every infeasible trial from the feasible."""
  finished = [t for t in study.trials if t.status != study_data.UNFINISHED]
  infeasible = [t for t in finished if t.infeasible]
  feasible = [t for t in finished if t.feasible]
  regions = []
  if not infeasible or not feasible:
    return regions
  for dim in study.varied_dimensions():
    if dim.numeric:
      values = [t.params.get(dim.name) for t in feasible]
      values = [float(v) for v in values if isinstance(v, (int, float))]
      if not values:
        continue
      lo, hi = min(values), max(values)
      above = [t for t in infeasible if _num(t.params.get(dim.name), np.inf) > hi]
      below = [t for t in infeasible if _num(t.params.get(dim.name), -np.inf) < lo]
      for side, members, edge in (("above", above, hi), ("below", below, lo)):
        if len(members) == len(infeasible):
          regions.append({"dimension": dim.name, "side": side, "value": edge,
                          "trials": [t.trial_id for t in members],
                          "text": f"{dim.name} {side} {fmt(edge)}"})
    else:
      counts = collections.defaultdict(lambda: [0, 0])
      for t in finished:
        counts[str(t.params.get(dim.name))][t.infeasible] += 1
      bad = [v for v, (ok, inf) in counts.items() if inf and not ok]
      covered = sum(counts[v][1] for v in bad)
      if bad and covered == len(infeasible):
        regions.append({"dimension": dim.name, "side": "values", "value": bad,
                        "trials": [t.trial_id for t in infeasible],
                        "text": f"{dim.name} in {{{', '.join(bad)}}}"})
  return regions


def _num(value: Any, default: float) -> float:
  return float(value) if isinstance(value, (int, float)) else default


def infeasible_trials(study: study_data.Study,
                      thresholds: findings_lib.Thresholds) -> list[Finding]:
  """The fraction of infeasible trials and where in the search space they lie."""
  finished = [t for t in study.trials if t.status != study_data.UNFINISHED]
  if not finished:
    return []
  infeasible = [t for t in finished if t.infeasible]
  fraction = len(infeasible) / len(finished)
  statuses = collections.Counter(
      t.status if t.status in study_data.INFEASIBLE_STATUSES else "no finite objective"
      for t in infeasible)
  regions = _where_infeasible(study)
  details = {"num_infeasible": len(infeasible), "num_finished": len(finished),
             "fraction": fraction, "statuses": dict(statuses),
             "trials": [t.trial_id for t in infeasible], "regions": regions,
             "reasons": sorted({t.reason for t in infeasible if t.reason})[:5],
             "warning_fraction": thresholds.infeasible_warning_fraction}
  if not infeasible:
    return [Finding("infeasible", "infeasible", INFO,
                    f"No infeasible trials (0 of {len(finished)} finished).", details)]
  counts = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
  message = (f"{len(infeasible)} of {len(finished)} finished trials "
             f"({percent(fraction)}) are infeasible ({counts}): "
             f"{trial_list(details['trials'])}.")
  if regions:
    message += (" All of them lie where " + " / ".join(r["text"] for r in regions)
                + " (beyond every feasible trial).")
  if len(infeasible) == len(finished):
    severity = WARNING
    message += (" No trial is feasible: look for a bug in the training code or "
                "the config, then shrink the search space to a region that trains.")
  elif fraction >= thresholds.infeasible_warning_fraction:
    severity = WARNING
    message += (" That is a very large fraction: adjust (or reparameterize) the "
                "search space to avoid sampling such points; many infeasible "
                "trials can also point to a bug in the training code.")
  else:
    severity = INFO
    message += " A small fraction: no change needed on this account."
  return [Finding("infeasible", "infeasible", severity, message, details)]


def unfinished_trials(study: study_data.Study) -> list[Finding]:
  """Trials with no summary.json: still running, killed, or never started."""
  unfinished = [t for t in study.trials if t.status == study_data.UNFINISHED]
  if not unfinished:
    return []
  parts = []
  for t in unfinished:
    files = ", ".join(t.present_files) if t.present_files else "no files"
    parts.append(f"{t.trial_id} ({files})")
  return [Finding(
      "unfinished", "unfinished", WARNING,
      f"{len(unfinished)} of {len(study.trials)} trials have no summary.json "
      f"(still running, killed, or failed to start) and are left out of the "
      f"analysis: {trial_list(parts)}. Relaunch them with their reproduce "
      f"command (it resumes from the last checkpoint) to complete the study.",
      {"trials": {t.trial_id: list(t.present_files) for t in unfinished}})]


def record_problems(study: study_data.Study) -> list[Finding]:
  """Unreadable or missing records, and study-level inconsistencies."""
  per_trial = {t.trial_id: t.problems for t in study.trials
               if t.problems and t.status != study_data.UNFINISHED}
  if not per_trial and not study.problems:
    return []
  lines = [f"{tid}: {'; '.join(p)}" for tid, p in per_trial.items()]
  return [Finding(
      "record_problems", "record_problems", INFO,
      "Some records are missing or unreadable; the analysis used what could be "
      "read. " + " | ".join(study.problems + lines[:6]),
      {"study": study.problems, "trials": per_trial})]


def best_step_fraction(study: study_data.Study,
                       thresholds: findings_lib.Thresholds) -> list[Finding]:
  """Where retrospective checkpoint selection found the best step."""
  fractions = {}
  for t in study.feasible_trials():
    if t.best_step is not None and t.max_train_steps:
      fractions[t.trial_id] = t.best_step / t.max_train_steps
  if not fractions:
    return []
  values = np.array(list(fractions.values()))
  best_id = next(iter(fractions))  # feasible_trials() is best first.
  early, late = (thresholds.early_best_step_fraction,
                 thresholds.late_best_step_fraction)
  late_share = float(np.mean(values > late))
  max_steps = sorted({t.max_train_steps for t in study.trials if t.max_train_steps})
  details = {"fractions": fractions, "min": values.min(),
             "median": float(np.median(values)), "max": values.max(),
             "late_share": late_share, "early_threshold": early,
             "late_threshold": late, "max_train_steps": max_steps}
  out = [Finding(
      "best_step_fraction", "best_step_fraction", INFO,
      f"Retrospective best step as a fraction of max_train_steps over "
      f"{len(values)} feasible trials: min {percent(values.min())}, median "
      f"{percent(details['median'])}, max {percent(values.max())}.", details)]
  if np.all(values <= early):
    out.append(Finding(
        "best_step_early", "best_step_early", WARNING,
        f"Every feasible trial found its best step in the first {percent(early)} "
        f"of training (latest at {percent(values.max())} of max_train_steps="
        f"{'/'.join(map(str, max_steps))}): max_train_steps is far too high. "
        f"Lower it (keep a margin above the latest best step) for the next study.",
        details))
  elif late_share >= thresholds.late_best_step_share and fractions[best_id] > late:
    out.append(Finding(
        "best_step_late", "best_step_late", WARNING,
        f"{percent(late_share)} of feasible trials, the best ({best_id}) among "
        f"them, found their best step in the last {percent(1 - late)} of "
        f"training: they would likely benefit from training longer. Increase "
        f"max_train_steps and re-tune the learning rate decay schedule.", details))
  return out
