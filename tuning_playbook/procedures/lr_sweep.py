r"""An initial max_train_steps from a constant learning-rate sweep.

The playbook, "Algorithm for picking an initial candidate for max_train_steps
using a learning rate sweep": grid-search the learning rate with a constant
schedule, without warmup, data augmentation or regularization, each trial
training N steps; the steps the fastest trial needs to fit the training set
perfectly are the first guess for max_train_steps.

  python -m tuning_playbook.playbook lr_sweep --config=configs/mnist1d_cnn.py \
      --study_dir=runs/cnn_lr_sweep --steps=2000 --eval_every=50 --run --parallel=2

"Perfect" is the first eval with `eval/train/error_rate` <= --train_error_threshold
(on the fixed training subset). The analysis refuses to conclude when the
fastest learning rate is at the edge of the grid ("Bad search spaces can make
it possible to engage in self-deception") or when no trial got there.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import matplotlib
from matplotlib.figure import Figure
import ml_collections
import numpy as np

from tuning_playbook.analysis import findings as findings_lib
from tuning_playbook.analysis.findings import Finding, fmt
from tuning_playbook.analysis.report_html import Code, Section
from tuning_playbook.analysis import study_data
from tuning_playbook.common import records
from tuning_playbook import config_paths
from tuning_playbook.procedures import Argument, Plan, ProcedureError
from tuning_playbook.procedures import SaveFigure
from tuning_playbook.studies import commands
from tuning_playbook.studies import study as study_lib
from tuning_playbook import workload as workload_lib

NAME = "lr_sweep"
DESCRIPTION = "Constant learning-rate grid: steps to fit the training set."
TRAIN_ERROR = "eval/train/error_rate"
LR_KEY = "optimizer.learning_rate"
# Optimizer keys that would add warmup, decay or regularization.
_FIXED = {"optimizer.schedule": "constant", "optimizer.warmup_steps": 0,
          "optimizer.weight_decay": 0.0}
_IF_PRESENT = {"optimizer.hold_steps": 0}
DEFAULT_DECADES = 1.0  # The default grid spans lr / 10 ... lr * 10.
_PICKS_STEPS = "this sweep picks max_train_steps itself"
GENERAL_CHECKS_LEFT_OUT = {
    "near_boundary": "its own finding checks the grid's edges",
    "not_enough_trials": "a grid, not a quasi-random sample",
    "sampling": "a grid, not a quasi-random sample",
    "still_improving": _PICKS_STEPS, "saturated": _PICKS_STEPS,
    "best_step_early": _PICKS_STEPS, "best_step_late": _PICKS_STEPS,
    "eval_cadence": _PICKS_STEPS,
    "loss_spikes": "rates past the stable edge on purpose; its own finding "
                   "names the trials that do not fit",
    "overfitting": "trained without regularization on purpose",
    "late_variance": "a constant learning rate on purpose",
}

ARGUMENTS = (
    Argument("learning_rates", "floats", None,
             "The grid (default: --num_points log-spaced in [--lr_min, "
             "--lr_max])."),
    Argument("lr_min", "float", None,
             "Smallest learning rate (default: the config's / 10)."),
    Argument("lr_max", "float", None,
             "Largest learning rate (default: the config's x 10)."),
    Argument("num_points", "int", 7, "Learning rates in the default grid."),
    Argument("steps", "int", None,
             "Steps per trial (default: the config's max_train_steps)."),
    Argument("eval_every", "int", None,
             "Eval period in steps: the resolution of the answer (default: "
             "steps / 40)."),
    Argument("train_error_threshold", "float", 0.0,
             "'Perfect' training performance: eval/train/error_rate at or "
             "below this."),
)


def _present(config: ml_collections.ConfigDict, key: str) -> bool:
  return key in config_paths.flatten(config.to_dict())


def learning_rates(config: ml_collections.ConfigDict,
                   args: Mapping[str, Any]) -> list[float]:
  """The grid: --learning_rates, or log-spaced between --lr_min and --lr_max."""
  if args.get("learning_rates"):
    rates = sorted(float(v) for v in args["learning_rates"])
    if len(rates) < 3 or len(set(rates)) != len(rates) or rates[0] <= 0:
      raise ProcedureError(
          f"--learning_rates={','.join(map(str, args['learning_rates']))}: "
          "needs at least 3 distinct positive values (the best one must be "
          "able to sit inside the grid)")
    return rates
  center = float(config.optimizer.learning_rate)
  lo = args.get("lr_min") or center / 10 ** DEFAULT_DECADES
  hi = args.get("lr_max") or center * 10 ** DEFAULT_DECADES
  num = args.get("num_points") or 7
  if not 0 < lo < hi:
    raise ProcedureError(f"--lr_min={lo} --lr_max={hi}: need 0 < lr_min < "
                         "lr_max (the config's learning rate is the default "
                         "center)")
  if num < 3:
    raise ProcedureError(f"--num_points={num}: must be >= 3")
  return [float(f"{v:.3g}") for v in np.geomspace(lo, hi, num)]


def plan(config: ml_collections.ConfigDict, args: Mapping[str, Any],
         source: Any) -> Plan:
  """A grid over the learning rate, constant, unregularized, --steps each."""
  del source  # Starts from the config (or the --from_study trial) as given.
  steps = args.get("steps") or config.max_train_steps
  if steps < 1:
    raise ProcedureError(f"--steps={steps}: must be >= 1")
  eval_every = args.get("eval_every") or max(1, steps // 40)
  if not 1 <= eval_every <= steps:
    raise ProcedureError(f"--eval_every={eval_every}: must be in [1, "
                         f"--steps={steps}]")
  threshold = args.get("train_error_threshold") or 0.0
  if not 0 <= threshold < 1:
    raise ProcedureError(f"--train_error_threshold={threshold}: must be in "
                         "[0, 1)")
  rates = learning_rates(config, args)
  off = workload_lib.load_workload(config.workload).regularization_off
  fixed = dict(_FIXED)
  fixed.update({k: v for k, v in {**_IF_PRESENT, **off}.items()
                if _present(config, k)})
  fixed.update({"max_train_steps": steps, "eval_every_steps": eval_every,
                "log_every_steps": min(config.log_every_steps, eval_every)})
  space = {
      "description": ("Constant learning-rate sweep without warmup or "
                      "regularization: steps to fit the training set."),
      "algorithm": "grid",
      "nuisance": {LR_KEY: {"values": rates}},
      "fixed": fixed}
  parameters = {"learning_rates": rates, "steps": steps,
                "eval_every": eval_every, "train_error_threshold": threshold,
                "switched_off": sorted(set(fixed) - {"max_train_steps",
                                                     "eval_every_steps",
                                                     "log_every_steps"})}
  return Plan(space, parameters)


def steps_to_fit(trial: study_data.Trial, threshold: float) -> int | None:
  """The first eval step with eval/train/error_rate <= threshold."""
  steps, errors = trial.series(TRAIN_ERROR)
  reached = np.flatnonzero(np.isfinite(errors) & (errors <= threshold + 1e-12))
  return int(steps[reached[0]]) if len(reached) else None


def _next_command(study: study_data.Study, max_train_steps: int) -> str:
  """The exploration study (tuning_playbook.sweep) at the suggested length."""
  record = study_lib.read_study_json(study.study_dir) or {}
  overrides = dict(record.get("config_overrides") or {})
  overrides["max_train_steps"] = max_train_steps
  parent = os.path.dirname(os.path.normpath(study.study_dir)) or "."
  stem = os.path.splitext(os.path.basename(study.config_path.split(":")[0]))[0]
  return commands.command_line(commands.module_argv(
      "tuning_playbook.sweep",
      [f"--config={study.config_path}",
       f"--study_dir={os.path.join(parent, stem + '_study')}",
       "--num_trials=16", "--seed=0"], overrides=overrides, run=True))


def _rerun_command(study: study_data.Study, params: Mapping[str, Any],
                   suffix: str, **flags: Any) -> str:
  """This procedure again with some flags changed, in a new study directory."""
  record = study_lib.read_study_json(study.study_dir) or {}
  values = {"steps": params["steps"], "eval_every": params["eval_every"],
            "train_error_threshold": params["train_error_threshold"],
            "learning_rates": params["learning_rates"], **flags}
  flags = [NAME, f"--config={study.config_path}",
           f"--study_dir={os.path.normpath(study.study_dir)}_{suffix}"]
  for key, value in values.items():
    text = (",".join(f"{v:.3g}" for v in value) if isinstance(value, list)
            else value)
    flags.append(f"--{key}={text}")
  return commands.command_line(commands.module_argv(
      "tuning_playbook.playbook", flags,
      overrides=record.get("config_overrides") or {}, run=True))


def _figure(rows, threshold) -> Figure:
  fig = Figure(figsize=(7, 4), layout="constrained")
  ax = fig.add_subplot()
  cmap = matplotlib.colormaps["viridis"]
  for i, row in enumerate(rows):
    steps, errors = row["trial"].series(TRAIN_ERROR)
    if len(steps):
      ax.plot(steps, errors, color=cmap(i / max(1, len(rows) - 1)),
              label=f"lr {fmt(row['learning_rate'])}")
  ax.axhline(threshold, color="gray", ls="--", lw=1)
  ax.set_xlabel("step")
  ax.set_ylabel(TRAIN_ERROR)
  ax.set_title("Training error per learning rate (constant schedule)")
  ax.legend(fontsize=7)
  return fig


def analyze(study: study_data.Study, save_figure: SaveFigure
            ) -> tuple[list[Finding], Section]:
  """Steps the fastest trial needed to fit the training set, and whether the
  grid lets us trust it."""
  params = study.procedure["parameters"]
  threshold = float(params["train_error_threshold"])
  grid = sorted(float(v) for v in params["learning_rates"])
  rows = sorted((_row(trial, threshold) for trial in study.trials),
                key=lambda r: r["learning_rate"] or 0)
  reached = [r for r in rows if r["steps_to_fit"] is not None]
  table = [{k: v for k, v in r.items() if k != "trial"} for r in rows]
  common = {"train_error_threshold": threshold, "steps_per_trial": params["steps"],
            "eval_every": params["eval_every"], "learning_rates": grid,
            "trials": table}
  found = []
  unfinished = [r["trial_id"] for r in rows
                if r["status"] == study_data.UNFINISHED]
  if unfinished:
    found.append(Finding(
        f"{NAME}/unfinished", NAME, findings_lib.WARNING,
        f"{len(unfinished)} trial(s) unfinished ({findings_lib.trial_list(unfinished)}): "
        "the conclusion below may change once they finish.",
        {"unfinished": unfinished}))
  if not reached:
    more = 2 * params["steps"]
    found.append(Finding(
        f"{NAME}/not_reached", NAME, findings_lib.WARNING,
        f"No trial reached {TRAIN_ERROR} <= {fmt(threshold)} within "
        f"{params['steps']} steps, so there is no candidate for "
        f"max_train_steps yet: rerun with more steps (e.g. --steps={more}).",
        {**common, "suggested_steps": more},
        command=_rerun_command(study, params, f"steps{more}", steps=more,
                               eval_every=max(1, more // 40))))
  else:
    fastest = min(reached, key=lambda r: (r["steps_to_fit"], -r["learning_rate"]))
    n = fastest["steps_to_fit"]
    lr = fastest["learning_rate"]
    details = {**common, "max_train_steps": n, "learning_rate": lr,
               "trial_id": fastest["trial_id"],
               "resolution_steps": params["eval_every"]}
    edge = ("smallest" if math.isclose(lr, grid[0]) else
            "largest" if math.isclose(lr, grid[-1]) else None)
    if edge:
      ratio = grid[1] / grid[0] if edge == "smallest" else grid[-1] / grid[-2]
      wider = (sorted(grid + [grid[0] / ratio, grid[0] / ratio ** 2])
               if edge == "smallest" else
               sorted(grid + [grid[-1] * ratio, grid[-1] * ratio ** 2]))
      found.append(Finding(
          f"{NAME}/edge", NAME, findings_lib.WARNING,
          f"No conclusion: the fastest trial ({fastest['trial_id']}, "
          f"{n} steps to {TRAIN_ERROR} <= {fmt(threshold)}) has the {edge} "
          f"learning rate of the grid, {fmt(lr)}. \"Bad search spaces can "
          "make it possible to engage in self-deception\": a learning rate "
          "past the edge may fit the training set sooner. Extend the grid.",
          {**details, "edge": edge, "suggested_learning_rates": wider},
          command=_rerun_command(study, params, "wider",
                                 learning_rates=wider)))
    else:
      found.append(Finding(
          f"{NAME}/max_train_steps", NAME, findings_lib.INFO,
          f"Initial max_train_steps: {n}. The fastest trial "
          f"({fastest['trial_id']}, learning rate {fmt(lr)}, inside the grid "
          f"{fmt(grid[0])}..{fmt(grid[-1])}) first reached {TRAIN_ERROR} <= "
          f"{fmt(threshold)} at step {n} (evals every {params['eval_every']} "
          f"steps). Use --config.max_train_steps={n} for the exploration "
          "study.", details, command=_next_command(study, n)))
  image = save_figure(_figure(rows, threshold), "lr_sweep_train_error",
                      f"{TRAIN_ERROR} per learning rate (dashed: threshold)")
  return found, _section(params, threshold, rows, image)


def _row(trial: study_data.Trial, threshold: float) -> dict[str, Any]:
  """A trial's learning rate, status, steps to fit and training errors."""
  _, errors = trial.series(TRAIN_ERROR)
  finite = errors[np.isfinite(errors)]
  return {"trial": trial, "trial_id": trial.trial_id,
          "learning_rate": trial.params.get(LR_KEY), "status": trial.status,
          "steps_to_fit": (steps_to_fit(trial, threshold)
                           if trial.status == records.COMPLETED else None),
          "final_train_error": float(finite[-1]) if len(finite) else None,
          "min_train_error": float(finite.min()) if len(finite) else None}


def _section(params: Mapping[str, Any], threshold: float,
             rows: list[dict[str, Any]], image: Any) -> Section:
  """The report's section: the training errors' figure, a row per trial."""
  return Section(
      NAME, "Learning-rate sweep: an initial max_train_steps",
      "A constant learning-rate grid without warmup, data augmentation or "
      "regularization (switched off: "
      + ", ".join(params.get("switched_off") or []) + "); each trial trains "
      f"{params['steps']} steps. The steps the fastest trial needs to reach "
      f"{TRAIN_ERROR} <= {fmt(threshold)} are the first guess for "
      "max_train_steps, provided its learning rate is not at the edge of the "
      "grid.",
      images=[image] if image else [],
      tables=[(["learning rate", "trial", "status", "steps to fit",
                "final train error", "lowest train error", "reproduce"],
               [[fmt(r["learning_rate"]), r["trial_id"], r["status"],
                 fmt(r["steps_to_fit"]) if r["steps_to_fit"] is not None
                 else "not reached", fmt(r["final_train_error"]),
                 fmt(r["min_train_error"]), Code(r["trial"].command)]
                for r in rows])])
