r"""Adopt a change or not: the baseline and a candidate, rerun with several seeds.

The playbook, "Determining whether to adopt a training pipeline change or
hyperparameter configuration": rerun the incumbent and the candidate several
times each, and adopt the candidate only when its improvement stands out of
the trial variance (and outweighs the complexity it adds).

  python -m tuning_playbook.playbook compare --config=configs/mnist1d_cnn.py \
      --study_dir=runs/cnn_compare --from_study=runs/cnn_study \
      --candidate=model.dropout_rate=0.1,optimizer.weight_decay=1e-4 --run

The baseline is --config (with the best trial of --from_study, if given); the
candidate is the baseline with `--candidate` overrides, or the best trial of
`--candidate_study`. Both train with --num_seeds new seeds, the same seeds
for both. The finding: the difference of the means with its standard error,
and a decision: adopt (better by more than `NOISE_MULTIPLE` standard
errors), worse, or not distinguishable from trial noise (then rerun with
more seeds).
"""

from __future__ import annotations

import ast
import math
import os
from typing import Any, Mapping

from matplotlib.figure import Figure
import ml_collections
import numpy as np

from tuning_playbook.analysis import findings as findings_lib
from tuning_playbook.analysis.findings import Finding, fmt
from tuning_playbook.analysis.report_html import Section
from tuning_playbook.analysis import study_data
from tuning_playbook import config_paths
from tuning_playbook.procedures import Argument, Plan, ProcedureError
from tuning_playbook.procedures import from_study
from tuning_playbook.procedures import SaveFigure
from tuning_playbook.procedures import seed_variance
from tuning_playbook.studies import commands
from tuning_playbook.studies import study as study_lib

NAME = "compare"
DESCRIPTION = "The baseline against a candidate, several seeds each: adopt or not."
ARM = "arm"
ARMS = ("baseline", "candidate")
NOISE_MULTIPLE = 2.0
_RERUNS = "reruns of two configurations, not a sample of a search space"
GENERAL_CHECKS_LEFT_OUT = {"near_boundary": _RERUNS, "not_enough_trials": _RERUNS,
                           "sampling": _RERUNS}

ARGUMENTS = (
    Argument("candidate", "string", None,
             "The change: comma-separated key=value config overrides."),
    Argument("candidate_study", "string", None,
             "Or a finished study whose best trial is the candidate."),
    Argument("num_seeds", "int", 5, "Seeds of each of the two (>= 2)."),
)


def parse_overrides(text: str) -> dict[str, Any]:
  """`a.b=1,c=relu` -> {"a.b": 1, "c": "relu"}; ProcedureError naming it."""
  out = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    key, sep, value = part.partition("=")
    if not sep or not key:
      raise ProcedureError(f"--candidate={text}: {part!r} is not key=value")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  if not out:
    raise ProcedureError(f"--candidate={text!r}: no key=value override")
  return out


def _candidate(args: Mapping[str, Any]) -> dict[str, Any]:
  if (args["candidate"] is None) == (args["candidate_study"] is None):
    raise ProcedureError("give exactly one of --candidate=KEY=VALUE,... and "
                         "--candidate_study=DIR")
  if args["candidate"] is not None:
    return parse_overrides(args["candidate"])
  source = from_study.Source.load(args["candidate_study"])
  return dict(source.top(1)[0].overrides)


def plan(config: ml_collections.ConfigDict, args: Mapping[str, Any],
         source: from_study.Source | None) -> Plan:
  """A grid of (arm, seed): the two arms differ in the candidate's keys."""
  del source  # The baseline `config` already holds its best trial.
  num_seeds = args["num_seeds"]
  if num_seeds is None or num_seeds < 2:
    raise ProcedureError(f"--num_seeds={num_seeds}: must be >= 2 (a standard "
                         "deviation needs two runs)")
  candidate = {k: v for k, v in _candidate(args).items()
               if k != seed_variance.SEED_KEY}
  baseline_values = config_paths.flatten(config)
  unknown = sorted(k for k in candidate if k not in baseline_values)
  if unknown:
    raise ProcedureError(f"the candidate sets {', '.join(unknown)}, which the "
                         "config does not have")
  baseline = {k: baseline_values[k] for k in candidate}
  changed = {k: v for k, v in candidate.items() if not from_study.same(v, baseline[k])}
  if not changed:
    raise ProcedureError("the candidate equals the baseline: nothing to compare")
  arms = [{k: baseline[k] for k in changed}, changed]
  first_seed = int(config.seed) + 1
  seeds = list(range(first_seed, first_seed + num_seeds))
  space = {"description": f"Adopt or not: {_describe(changed)}, {num_seeds} seeds each.",
           "algorithm": "grid",
           "nuisance": {ARM: {"values": arms}, seed_variance.SEED_KEY: {"values": seeds}}}
  return Plan(space, {"arms": dict(zip(ARMS, arms)), "num_seeds": num_seeds,
                      "seeds": seeds})


def _describe(overrides: Mapping[str, Any]) -> str:
  return ", ".join(f"{k}={v!r}" for k, v in overrides.items())


def decide(baseline: list[float], candidate: list[float], mode: str) -> dict[str, Any]:
  """The difference of means (candidate - baseline), its standard error and
  the decision: adopt, worse, or noise."""
  b, c = (seed_variance.rerun_statistics(v) for v in (baseline, candidate))
  if b["std"] is None or c["std"] is None:
    return {"baseline": b, "candidate": c, "decision": None}
  difference = c["mean"] - b["mean"]
  error = math.sqrt(b["std"] ** 2 / b["n"] + c["std"] ** 2 / c["n"])
  gain = -difference if mode == "min" else difference
  decision = ("adopt" if gain > NOISE_MULTIPLE * error else
              "worse" if -gain > NOISE_MULTIPLE * error else "noise")
  return {"baseline": b, "candidate": c, "difference": difference,
          "standard_error": error, "threshold": NOISE_MULTIPLE * error,
          "decision": decision}


def _arm_values(study: study_data.Study, arm: Mapping[str, Any]) -> list[float]:
  return [t.best_value for t in study.feasible_trials()
          if all(from_study.same(t.params.get(k), v) for k, v in arm.items())]


def _figure(values: Mapping[str, list[float]], metric: str) -> Figure:
  fig = Figure(figsize=(5, 3.6), layout="constrained")
  ax = fig.add_subplot()
  for i, arm in enumerate(ARMS):
    ax.scatter(np.full(len(values[arm]), i), values[arm], alpha=0.7)
    if values[arm]:
      ax.hlines(np.mean(values[arm]), i - 0.2, i + 0.2, color="black")
  ax.set_xticks(range(len(ARMS)), list(ARMS))
  ax.set_ylabel(metric)
  ax.set_title("Each seed's best value (line: mean)")
  return fig


def analyze(study: study_data.Study, save_figure: SaveFigure
            ) -> tuple[list[Finding], Section]:
  """The decision, the playbook's way."""
  params = study.procedure["parameters"]
  metric, mode = study.objective.metric, study.objective.mode
  values = {arm: _arm_values(study, params["arms"][arm]) for arm in ARMS}
  result = decide(values["baseline"], values["candidate"], mode)
  change = _describe(params["arms"]["candidate"])
  command = None
  if result["decision"] is None:
    message = (f"Compare {change}: fewer than two finished seeds of an arm "
               f"({len(values['baseline'])} baseline, {len(values['candidate'])} "
               f"candidate); finish the study first.")
  else:
    b, c = result["baseline"], result["candidate"]
    message = (f"Compare {change}: {metric} {fmt(c['mean'])} ± {fmt(c['std'])} "
               f"(candidate, {c['n']} seeds) against {fmt(b['mean'])} ± "
               f"{fmt(b['std'])} (baseline, {b['n']} seeds): a difference of "
               f"{fmt(result['difference'])} ± {fmt(result['standard_error'])} "
               f"(standard error). ")
    message += {
        "adopt": "Better by more than the trial noise: adopt it, if the gain "
                 "outweighs the complexity it adds.",
        "worse": "Worse by more than the trial noise: keep the baseline.",
        "noise": (f"Not distinguishable from trial noise (within "
                  f"{NOISE_MULTIPLE:g} standard errors): keep the baseline, or "
                  f"rerun with more seeds."),
    }[result["decision"]]
    if result["decision"] == "noise":
      command = _more_seeds_command(study, 2 * int(params["num_seeds"]))
  finding = Finding(f"{NAME}/decision", NAME, findings_lib.INFO, message,
                    {**result, "metric": metric, "mode": mode, "values": values,
                     "arms": params["arms"]}, command=command)
  image = save_figure(_figure(values, metric), "compare", "Baseline and candidate")
  section = Section(NAME, "Adopt the change or not",
                    "Both configurations rerun with the same seeds; a change "
                    "is adopted only when it beats the trial variance.",
                    images=[image] if image else [])
  return [finding], section


def _more_seeds_command(study: study_data.Study, num_seeds: int) -> str:
  """This comparison again with `num_seeds` seeds, in a new directory."""
  params = study.procedure["parameters"]
  record = study_lib.read_study_json(study.study_dir) or {}
  flags = [NAME, f"--config={study.config_path}",
           f"--study_dir={os.path.normpath(study.study_dir)}_more_seeds"]
  source = from_study.find_study_dir(params)
  if source:
    flags.append(f"--from_study={source}")
  flags += [f"--candidate={','.join(f'{k}={v!r}' for k, v in params['arms']['candidate'].items())}",
            f"--num_seeds={num_seeds}"]
  return commands.command_line(commands.module_argv(
      "tuning_playbook.playbook", flags,
      overrides=record.get("config_overrides") or {},
      trainer_module=record.get("trainer_module") or commands.DEFAULT_TRAINER,
      run=True))
