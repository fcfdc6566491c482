r"""Run-to-run trial variance: the best trial(s) of a study rerun with new seeds.

The playbook, "Determining whether to adopt a training pipeline change or
hyperparameter configuration": "consider running the best trial N times to
characterize the run-to-run trial variance", and weigh it against the study
variance (how differently the search could have ended).

  python -m tuning_playbook.playbook seed_variance --config=configs/mnist1d_cnn.py \
      --study_dir=runs/cnn_seeds --from_study=runs/cnn_study --num_seeds=5 \
      --top_k=2 --run --parallel=2

reruns each of the --top_k best trials of --from_study with `config.seed` set
to N new values (the trial's own seed + 1, + 2, ...). The objective of each
rerun is its retrospective best, as in any study.
"""

from __future__ import annotations

from typing import Any, Mapping

from matplotlib.figure import Figure
import ml_collections
import numpy as np

from tuning_playbook.analysis import bootstrap
from tuning_playbook.analysis import findings as findings_lib
from tuning_playbook.analysis.findings import Finding, fmt
from tuning_playbook.analysis.report_html import Section
from tuning_playbook.analysis import study_data
from tuning_playbook.procedures import Argument, Plan, ProcedureError
from tuning_playbook.procedures import from_study
from tuning_playbook.procedures import SaveFigure

NAME = "seed_variance"
DESCRIPTION = "Rerun the best trial(s) of --from_study with N seeds."
NEEDS_FROM_STUDY = True
SEED_KEY = "seed"
REFERENCE = "from_trial"
# Differences between top trials below this many rerun standard deviations
# are within trial noise.
NOISE_MULTIPLE = 2.0
COMPARED_TOP_TRIALS = 5
_RERUNS = "reruns of the same hyperparameters, not a sample of a search space"
GENERAL_CHECKS_LEFT_OUT = {"near_boundary": _RERUNS, "not_enough_trials": _RERUNS,
                           "sampling": _RERUNS}

ARGUMENTS = (
    Argument("num_seeds", "int", 5, "Reruns of each trial (new seeds)."),
    Argument("top_k", "int", 1, "How many of the best trials to rerun."),
)


def plan(config: ml_collections.ConfigDict, args: Mapping[str, Any],
         source: from_study.Source) -> Plan:
  """A grid of (reference trial, seed); common overrides are fixed."""
  num_seeds, top_k = args["num_seeds"], args["top_k"]
  if num_seeds is None or num_seeds < 2:
    raise ProcedureError(f"--num_seeds={num_seeds}: must be >= 2 (a standard "
                         "deviation needs two runs)")
  references = from_study.best_references(source, top_k)
  common, own = from_study.split_common(
      [{k: v for k, v in r.overrides.items() if k != SEED_KEY} for r in references])
  first_seed = int(config.seed) + 1
  seeds = list(range(first_seed, first_seed + num_seeds))
  nuisance = {}
  if top_k > 1:
    nuisance[REFERENCE] = {"values": own}
  nuisance[SEED_KEY] = {"values": seeds}
  space = {"description": (f"Trial variance: the best {top_k} trial(s) of "
                           f"{source.study_dir}, {num_seeds} seeds each."),
           "algorithm": "grid", "nuisance": nuisance, "fixed": common}
  parameters = {"num_seeds": num_seeds, "top_k": top_k, "seeds": seeds,
                "references": [dict(r.to_json(), own_overrides=o)
                               for r, o in zip(references, own)]}
  return Plan(space, parameters)


def _reruns(study: study_data.Study, reference: Mapping[str, Any]
            ) -> list[study_data.Trial]:
  own = reference["own_overrides"]
  return [t for t in study.trials
          if all(from_study.same(t.params.get(k), v) for k, v in own.items())]


def rerun_statistics(values: list[float]) -> dict[str, Any]:
  """Mean, sample standard deviation and range of the reruns' objective."""
  x = np.asarray(values, dtype=np.float64)
  return {"n": len(x), "mean": float(x.mean()) if len(x) else None,
          "std": float(x.std(ddof=1)) if len(x) > 1 else None,
          "min": float(x.min()) if len(x) else None,
          "max": float(x.max()) if len(x) else None,
          "range": float(x.max() - x.min()) if len(x) else None}


def _figure(groups, metric: str) -> Figure:
  fig = Figure(figsize=(6.4, 3.8), layout="constrained")
  ax = fig.add_subplot()
  for i, (ref, values) in enumerate(groups):
    ax.scatter(np.full(len(values), i), values, color="#1f77b4",
               label="reruns" if i == 0 else None)
    ax.scatter([i], [ref["best_value"]], marker="*", s=120, color="#ff9f1c",
               label="original trial" if i == 0 else None)
  ax.set_xticks(range(len(groups)),
                [f"trial {ref['trial_id']}" for ref, _ in groups])
  ax.set_ylabel(metric)
  ax.set_title("Objective of each rerun")
  ax.legend(fontsize=8)
  return fig


def analyze(study: study_data.Study, save_figure: SaveFigure
            ) -> tuple[list[Finding], Section]:
  """Trial variance per rerun trial, set against the source study."""
  params = study.procedure["parameters"]
  metric = study.objective.metric
  found, rows, groups, stats_by_ref = [], [], [], {}
  for ref in params["references"]:
    trials = _reruns(study, ref)
    values = [t.best_value for t in trials if t.feasible]
    stats = rerun_statistics(values)
    stats_by_ref[ref["trial_id"]] = stats
    groups.append((ref, values))
    infeasible = [t.trial_id for t in trials if t.infeasible]
    unfinished = [t.trial_id for t in trials
                  if t.status == study_data.UNFINISHED]
    details = {"reference_trial": ref["trial_id"],
               "reference_value": ref["best_value"], "metric": metric,
               "values": values, "seeds": [t.params.get(SEED_KEY) for t in trials
                                           if t.feasible],
               "infeasible": infeasible, "unfinished": unfinished, **stats}
    if stats["std"] is None:
      found.append(Finding(
          f"{NAME}/trial/{ref['trial_id']}", NAME, findings_lib.WARNING,
          f"Trial {ref['trial_id']}: {len(values)} finished rerun(s), too few "
          "for a standard deviation.", details))
      continue
    found.append(Finding(
        f"{NAME}/trial/{ref['trial_id']}", NAME, findings_lib.INFO,
        f"Trial {ref['trial_id']} ({fmt(ref['best_value'])} in the study) over "
        f"{stats['n']} seeds: {metric} mean {fmt(stats['mean'])}, standard "
        f"deviation {fmt(stats['std'])}, range {fmt(stats['min'])}.."
        f"{fmt(stats['max'])}" + (f"; {len(infeasible)} infeasible"
                                  if infeasible else "") + ".", details))
    rows.append([ref["trial_id"], fmt(ref["best_value"]), str(stats["n"]),
                 fmt(stats["mean"]), fmt(stats["std"]), fmt(stats["min"]),
                 fmt(stats["max"])])
  source_dir = from_study.find_study_dir(params)
  best_std = stats_by_ref.get(params["references"][0]["trial_id"], {}).get("std")
  notes = []
  if source_dir is None:
    notes.append("The source study is no longer where study.json says; its "
                 "trials are not compared.")
  elif best_std is not None:
    source = study_data.load_study(source_dir)
    found += _compare_with_source(source, best_std, params)
  image = save_figure(_figure(groups, metric), "seed_variance",
                      "Retrospective best objective of each rerun (star: the "
                      "original trial)")
  section = Section(
      NAME, "Trial variance: reruns with new seeds",
      "The best trial(s) of the source study rerun with only config.seed "
      "changed: the run-to-run (trial) variance. Differences between trials "
      f"smaller than {NOISE_MULTIPLE:g} rerun standard deviations are within "
      "trial noise; the study variance (how the best of a repeat study would "
      "spread, by bootstrap) is shown beside it.",
      images=[image] if image else [], notes=notes,
      tables=[(["trial", "value in study", "reruns", "mean", "std", "min",
                "max"], rows)])
  return found, section


def _compare_with_source(source: study_data.Study, std: float,
                         params: Mapping[str, Any]) -> list[Finding]:
  """Which top trials of the source are within noise; study vs trial variance."""
  out = []
  top = source.feasible_trials()[:max(COMPARED_TOP_TRIALS, params["top_k"])]
  best = top[0]
  gaps = [{"trial_id": t.trial_id, "value": t.best_value,
           "difference": abs(t.best_value - best.best_value),
           "within_noise": abs(t.best_value - best.best_value)
           < NOISE_MULTIPLE * std} for t in top[1:]]
  within = [g["trial_id"] for g in gaps if g["within_noise"]]
  out.append(Finding(
      f"{NAME}/within_noise", NAME, findings_lib.INFO,
      (f"Of the next {len(gaps)} best trials of {source.name}, "
       f"{len(within)} ({findings_lib.trial_list(within) or 'none'}) differ "
       f"from the best ({best.trial_id}) by less than {NOISE_MULTIPLE:g} "
       f"rerun standard deviations ({fmt(NOISE_MULTIPLE * std)}): within "
       "trial noise, not evidence that the best trial's hyperparameters are "
       "better."),
      {"best_trial": best.trial_id, "best_value": best.best_value,
       "trial_std": std, "noise_multiple": NOISE_MULTIPLE,
       "threshold": NOISE_MULTIPLE * std, "compared": gaps,
       "within_noise": within}))
  result = bootstrap.run(source, findings_lib.Thresholds())
  if result is not None:
    n = result.budgets[-1]
    draws = result.best[n]
    draws = draws[np.isfinite(draws)]
    study_std = float(draws.std(ddof=1)) if len(draws) > 1 else None
    q1, _, q3 = result.quartiles(n)
    ratio = study_std / std if study_std is not None and std > 0 else None
    out.append(Finding(
        f"{NAME}/study_variance", NAME, findings_lib.INFO,
        f"Trial variance beside study variance: rerun standard deviation "
        f"{fmt(std)}; the best of a repeat study of {n} trials (bootstrap of "
        f"{source.name}) spreads with standard deviation {fmt(study_std)} "
        f"(interquartile range {fmt(q3 - q1)})"
        + (f", {fmt(ratio)} times the trial variance." if ratio is not None
           else "."),
        {"trial_std": std, "study_std": study_std, "study_iqr": q3 - q1,
         "study_num_trials": n, "ratio": ratio}))
  return out
