"""Search-space checks: boundaries, infeasible trials, and how long to train.

From the playbook's "Identifying bad search space boundaries", "Extracting
insight from experimental results" and "Deciding how long to train when
training is not compute-bound".

  for finding in search_space_checks.check(study, findings.Thresholds()):
    print(finding.message)
"""

from __future__ import annotations

import collections
import math
from typing import Any

import numpy as np

from tuning_playbook.analysis import findings as findings_lib
from tuning_playbook.analysis.findings import Finding, fmt, percent, trial_list
from tuning_playbook.analysis import isolation
from tuning_playbook.analysis import study_data
from tuning_playbook import study_presets

INFO, WARNING = findings_lib.INFO, findings_lib.WARNING


def check(study: study_data.Study,
          thresholds: findings_lib.Thresholds) -> list[Finding]:
  """Every search-space finding for the study."""
  return (unfinished_trials(study) + record_problems(study)
          + near_boundary(study, thresholds)
          + infeasible_trials(study, thresholds)
          + instability_edge(study, thresholds)
          + best_step_fraction(study, thresholds)
          + eval_cadence(study, thresholds))


def _bounded(study: study_data.Study,
             dim: study_data.Dimension) -> study_data.Dimension:
  return isolation.with_observed_bounds(
      dim, [t.values.get(dim.name) for t in study.trials])


def _candidates(study: study_data.Study) -> list[tuple[study_data.Trial, str, str]]:
  """(trial, who it is, the scientific dimension it was chosen within or "")."""
  best = study.best_trial()
  if best is None:
    return []
  out = [(best, "the best trial", "")]
  for dim in study.scientific_dimensions():
    for group in isolation.groups(study, dim):
      top = isolation.best_trials(study, group, 1)
      if top and all(top[0] is not c[0] for c in out):
        out.append((top[0], f"the best trial of {dim.name} = {group.label}", dim.name))
  return out


WARMUP_STEPS = "optimizer.warmup_steps"


def _natural_limit(dim: study_data.Dimension, side: str,
                   trial: study_data.Trial) -> tuple[float, str] | None:
  """How far the range may go on `side`, and why; None: no limit."""
  if side == "min" and float(dim.min) >= 0:
    return 0.0, f"{dim.name} cannot go below 0"
  if side == "max" and dim.name == WARMUP_STEPS:
    steps = (trial.config or {}).get("max_train_steps")
    if isinstance(steps, int) and steps > 0:
      fraction = study_presets.MAX_WARMUP_FRACTION
      return (math.floor(fraction * steps),
              f"a warmup longer than {percent(fraction)} of training "
              f"({steps} steps) is past the playbook's guidance")
  return None


def _extended_bound(dim: study_data.Dimension, side: str,
                    trial: study_data.Trial) -> tuple[float | None, str | None]:
  """The bound moved out by a quarter of the range, on the dimension's scale,
  short of any natural limit; (None, why) when the bound is at that limit."""
  value = dim.value_at(-0.25 if side == "min" else 1.25)
  limit = _natural_limit(dim, side, trial)
  if limit is not None:
    value = max(value, limit[0]) if side == "min" else min(value, limit[0])
  if dim.scale in study_data.INT_SCALES:
    value = math.floor(value) if side == "min" else math.ceil(value)
  bound = float(dim.min if side == "min" else dim.max)
  if limit is not None and (value >= bound if side == "min" else value <= bound):
    return None, limit[1]
  return value, None


def near_boundary(study: study_data.Study,
                  thresholds: findings_lib.Thresholds) -> list[Finding]:
  """The best trial (overall, or of a scientific value) lies near a range's edge."""
  margin = thresholds.boundary_margin
  hits = collections.defaultdict(list)  # (dimension, side) -> [(trial, who, position)]
  dims = {d.name: _bounded(study, d) for d in study.varied_dimensions() if d.numeric}
  for trial, who, within in _candidates(study):
    for name, dim in dims.items():
      position = dim.position(trial.values.get(name))
      if name == within or position is None:
        continue
      if position <= margin:
        hits[(name, "min")].append((trial, who, position))
      elif position >= 1 - margin:
        hits[(name, "max")].append((trial, who, position))
  out = []
  for (name, side), found in hits.items():
    dim = dims[name]
    trial, who, position = found[0]
    bound, word = (dim.min, "below") if side == "min" else (dim.max, "above")
    beyond = []
    for other in study.trials:
      p = dim.position(other.values.get(name))
      if (other.status != study_data.UNFINISHED and p is not None
          and (p < position if side == "min" else p > position)):
        beyond.append(other)
    infeasible_beyond = bool(beyond) and all(t.infeasible for t in beyond)
    suggested, limit = _extended_bound(dim, side, trial)
    value = trial.values.get(name)
    message = (
        f"{who[0].upper()}{who[1:]} ({trial.trial_id}) has {name} = {fmt(value)}, "
        f"in the outer {percent(margin)} of the search range [{fmt(dim.min)}, "
        f"{fmt(dim.max)}] ({dim.scale} scale), next to its {side} boundary. ")
    if suggested is None:
      message += (f"The range cannot extend {word} {fmt(bound)} ({limit}): "
                  f"the best values sit at the edge of what is worth searching, "
                  f"which is an answer, not a range to widen.")
    else:
      message += (f"Better trials may lie {word} {fmt(bound)}: extend the range "
                  f"{word} {fmt(bound)} (e.g. to {fmt(suggested)}) and run "
                  f"another study.")
    if len(found) > 1:
      message += " Also near it: " + ", ".join(
          f"{w} ({t.trial_id})" for t, w, _ in found[1:]) + "."
    if infeasible_beyond and suggested is not None:
      message += (
          f" Every trial {word} it ({len(beyond)}) was infeasible: the model may be "
          f"unstable there, so first try the fixes for training instability "
          f"(warmup, gradient clipping) that could make {word} values usable.")
    out.append(Finding(
        id=f"near_boundary/{name}/{side}", kind="near_boundary",
        severity=WARNING if suggested is not None else INFO, message=message,
        details={"dimension": name, "side": side, "role": dim.role,
                 "scale": dim.scale, "value": value, "bound": bound,
                 "position": position, "margin": margin,
                 "best_trial": trial.trial_id,
                 "trials": {t.trial_id: w for t, w, _ in found},
                 "suggested_bound": suggested, "natural_limit": limit,
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
    if any(dim.name not in t.values for t in infeasible):
      continue  # The dimension does not exist for some of them.
    if dim.numeric:
      values = [t.values.get(dim.name) for t in feasible]
      values = [float(v) for v in values if isinstance(v, (int, float))]
      if not values:
        continue
      lo, hi = min(values), max(values)
      above = [t for t in infeasible if _num(t.values.get(dim.name), np.inf) > hi]
      below = [t for t in infeasible if _num(t.values.get(dim.name), -np.inf) < lo]
      for side, members, edge in (("above", above, hi), ("below", below, lo)):
        if len(members) == len(infeasible):
          regions.append({"dimension": dim.name, "side": side, "value": edge,
                          "trials": [t.trial_id for t in members],
                          "text": f"{dim.name} {side} {fmt(edge)}"})
    else:
      counts = collections.defaultdict(lambda: [0, 0])
      for t in finished:
        counts[str(t.values.get(dim.name))][t.infeasible] += 1
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
    message += (" All of them lie beyond every feasible trial in: "
                + "; ".join(r["text"] for r in regions) + ".")
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


def instability_edge(study: study_data.Study,
                     thresholds: findings_lib.Thresholds) -> list[Finding]:
  """The playbook's Figure 7a: the best trial sits just below the learning
  rate above which every trial is infeasible."""
  best = study.best_trial()
  dims = {d.name: d for d in study.varied_dimensions() if d.numeric}
  for region in _where_infeasible(study):
    name = region["dimension"]
    if (best is None or region["side"] != "above" or name not in dims
        or not name.endswith("learning_rate")):
      continue
    dim = _bounded(study, dims[name])
    edge, at = dim.position(region["value"]), dim.position(best.values.get(name))
    if edge is None or at is None or edge - at > thresholds.instability_edge_margin:
      continue
    return [Finding(
        "instability_edge", "instability_edge", WARNING,
        f"Every infeasible trial ({len(region['trials'])}) has {name} above "
        f"{fmt(region['value'])}, and the best trial ({best.trial_id}, "
        f"{name} = {fmt(best.values.get(name))}) sits just below that edge: "
        f"the best learning rate is limited by training instability (the "
        f"playbook's Figure 7a). Find where instability starts; warmup or "
        f"gradient clipping may make higher rates usable and better.",
        {"dimension": name, "edge": region["value"], "edge_position": edge,
         "best_trial": best.trial_id, "best_position": at,
         "infeasible_trials": region["trials"],
         "margin": thresholds.instability_edge_margin})]
  return []


def unfinished_trials(study: study_data.Study) -> list[Finding]:
  """Trials with no summary.json: still running, killed or never started."""
  unfinished = [t for t in study.trials if t.status == study_data.UNFINISHED]
  if not unfinished:
    return []
  parts = []
  for t in unfinished:
    files = ", ".join(t.present_files) if t.present_files else "no files"
    parts.append(f"{t.trial_id} ({files})")
  return [Finding(
      "unfinished", "unfinished", WARNING,
      f"{len(unfinished)} of {len(study.trials)} trials have no "
      f"summary.json (still running, killed, or failed to start) and are left "
      f"out of the analysis: {trial_list(parts)}. Relaunch them with their "
      f"reproduce command (it resumes from the last checkpoint) to complete "
      f"the study.",
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
    if t.best_step is not None and t.total_train_steps:
      fractions[t.trial_id] = t.best_step / t.total_train_steps
  if not fractions:
    return []
  values = np.array(list(fractions.values()))
  best_id = next(iter(fractions))  # feasible_trials() is best first.
  early, late = (thresholds.early_best_step_fraction,
                 thresholds.late_best_step_fraction)
  late_share = float(np.mean(values > late))
  total_steps = sorted({t.total_train_steps for t in study.trials
                        if t.total_train_steps})
  details = {"fractions": fractions, "min": values.min(),
             "median": float(np.median(values)), "max": values.max(),
             "late_share": late_share, "early_threshold": early,
             "late_threshold": late, "total_train_steps": total_steps}
  out = [Finding(
      "best_step_fraction", "best_step_fraction", INFO,
      f"Retrospective best step as a fraction of the steps trained "
      f"(total_train_steps: max_train_steps plus a prepended warmup) over "
      f"{len(values)} feasible trials: min {percent(values.min())}, median "
      f"{percent(details['median'])}, max {percent(values.max())}.", details)]
  if np.all(values <= early):
    out.append(Finding(
        "best_step_early", "best_step_early", WARNING,
        f"Every feasible trial found its best step in the first {percent(early)} "
        f"of training (latest at {percent(values.max())} of total_train_steps="
        f"{'/'.join(map(str, total_steps))}): max_train_steps is far too high. "
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


def eval_cadence(study: study_data.Study,
                 thresholds: findings_lib.Thresholds) -> list[Finding]:
  """Evals too sparse for the best-step rules: none inside the first
  `early_best_step_fraction` of training, or fewer than two in its last
  1 - `late_best_step_fraction`."""
  cadences = {}
  for t in study.feasible_trials():
    every = (t.config or {}).get("eval_every_steps")
    if isinstance(every, int) and every > 0 and t.total_train_steps:
      cadences[t.trial_id] = every / t.total_train_steps
  if not cadences:
    return []
  densest = min(cadences.values())
  early, late_window = (thresholds.early_best_step_fraction,
                        1 - thresholds.late_best_step_fraction)
  problems = []
  if densest > early:
    problems.append(
        f"the first eval comes after {percent(densest)} of training, so no best "
        f"step can fall in the first {percent(early)} (where it would say "
        f"max_train_steps is far too high)")
  if densest > late_window / 2:
    problems.append(
        f"fewer than two evals fall in the last {percent(late_window)}, so a best "
        f"step there says little about whether training longer would help")
  if not problems:
    return []
  shortest = min(t.total_train_steps for t in study.feasible_trials()
                 if t.trial_id in cadences)
  suggested = max(1, math.floor(min(early, late_window / 2) * shortest))
  return [Finding(
      "eval_cadence", "eval_cadence", INFO,
      f"Evals every {percent(densest)} of training or less often: "
      + "; ".join(problems) + f". Evaluate more often in the next study, e.g. "
      f"--config.eval_every_steps={suggested} (of {shortest} steps).",
      {"fractions": cadences, "early_threshold": early,
       "late_window": late_window, "suggested_eval_every_steps": suggested})]
