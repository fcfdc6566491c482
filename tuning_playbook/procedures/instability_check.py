r"""Early training instability: short runs at learning rates above the best.

The playbook, "Identifying unstable workloads": plot training loss curves for
learning rates just above the best one, lr*; loss that goes up, not down,
during periods of training means fixing the instability will likely help.
"Common evaluation schedules can miss these issues by not evaluating
frequently enough": train about 500 steps at 2 x lr*, evaluating every step.

  python -m tuning_playbook.playbook instability_check \
      --config=configs/mnist1d_cnn.py --study_dir=runs/cnn_instability \
      --from_study=runs/cnn_study --steps=500 --run --parallel=2

Every trial is the best trial of --from_study with max_train_steps=--steps and
the learning rate times each of --lr_factors (1.25, 1.5, 2, 3); the 2x trial
evaluates every --eval_every steps (every step by default), the others only
at the end. Spikes and divergence are read from the per-step training loss
(grad_norms.jsonl; see tuning_playbook/analysis/loss_spikes.py). When a rate
is unstable, the finding gives the warmup procedure's command for it.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping

import matplotlib
from matplotlib.figure import Figure
import ml_collections
import numpy as np

from tuning_playbook.analysis import findings as findings_lib
from tuning_playbook.analysis.findings import Finding, fmt
from tuning_playbook.analysis import loss_spikes
from tuning_playbook.analysis.report_html import Code, Section
from tuning_playbook.analysis import study_data
from tuning_playbook.common import records
from tuning_playbook.procedures import Argument, Plan, ProcedureError
from tuning_playbook.procedures import from_study
from tuning_playbook.procedures import SaveFigure
from tuning_playbook.studies import commands
from tuning_playbook.studies import study as study_lib

NAME = "instability_check"
DESCRIPTION = "Short runs above the best learning rate: early loss spikes?"
NEEDS_FROM_STUDY = True
LR_KEY = "optimizer.learning_rate"
EVALUATED_FACTOR = 2.0

_GRID = "learning rates at set multiples of the best, not a sample"
_SHORT = "short runs that probe stability, not train to a result"
_UNSTABLE = "trials made unstable on purpose; the procedure's own finding examines them"
GENERAL_CHECKS_LEFT_OUT = {
    "near_boundary": _GRID, "not_enough_trials": _GRID, "sampling": _GRID,
    "infeasible": _UNSTABLE, "training_loss_increasing": _UNSTABLE,
    "loss_spikes": _UNSTABLE,
    "best_step_fraction": _SHORT, "best_step_early": _SHORT, "best_step_late": _SHORT,
    "still_improving": _SHORT, "saturated": _SHORT, "overfitting": _SHORT,
    "late_variance": _SHORT, "curves_ok": _SHORT, "eval_cadence": _SHORT,
}

ARGUMENTS = (
    Argument("steps", "int", 500, "max_train_steps of every trial."),
    Argument("lr_factors", "floats", (1.25, 1.5, 2.0, 3.0),
             "Multiples of the best learning rate, one trial each (2 is the "
             "one evaluated every --eval_every steps)."),
    Argument("eval_every", "int", 1,
             "Eval period of the 2x trial (the others evaluate at the end)."),
)


def plan(config: ml_collections.ConfigDict, args: Mapping[str, Any],
         source: from_study.Source) -> Plan:
  """One trial per factor, everything else as in the best trial."""
  steps, every = args["steps"], args["eval_every"]
  factors = sorted(float(f) for f in args["lr_factors"] or ())
  if steps is None or steps < 2:
    raise ProcedureError(f"--steps={steps}: must be >= 2")
  if every is None or not 1 <= every <= steps:
    raise ProcedureError(f"--eval_every={every}: must be in [1, --steps={steps}]")
  if not factors or factors[0] <= 0 or len(set(factors)) != len(factors):
    raise ProcedureError("--lr_factors: needs distinct positive values")
  best_lr = float(config.optimizer.learning_rate)
  values = []
  for f in factors:
    evaluated = math.isclose(f, EVALUATED_FACTOR)
    values.append({LR_KEY: float(f"{best_lr * f:.6g}"),
                   "eval_every_steps": every if evaluated else steps,
                   "log_every_steps": (min(config.log_every_steps, every)
                                       if evaluated else config.log_every_steps)})
  space = {"description": (f"Learning rates {', '.join(f'{f:g}' for f in factors)}"
                           f" x the best ({fmt(best_lr)}), {steps} steps each."),
           "algorithm": "grid",
           "nuisance": {"learning_rate": {"values": values}},
           "fixed": {"max_train_steps": steps, "num_best_checkpoints": 1}}
  parameters = {"steps": steps, "eval_every": every, "lr_factors": factors,
                "best_learning_rate": best_lr}
  return Plan(space, parameters)


def _learning_rate(trial: study_data.Trial) -> float | None:
  value = ((trial.config or {}).get("optimizer") or {}).get("learning_rate")
  return float(value) if isinstance(value, (int, float)) else None


def trial_stability(trial: study_data.Trial,
                    thresholds: findings_lib.Thresholds
                    ) -> loss_spikes.LossStability:
  """Spikes, divergence and stalling in a trial's per-step training loss."""
  steps, losses = trial.step_losses
  diverged = trial.final_step if trial.status == records.DIVERGED else None
  return loss_spikes.examine(steps, losses, thresholds, diverged_step=diverged)


def examined_trials(study: study_data.Study,
                    value_of: Callable[[study_data.Trial], Any],
                    thresholds: findings_lib.Thresholds
                    ) -> list[tuple[study_data.Trial, Any,
                                    loss_spikes.LossStability]]:
  """(trial, value_of(trial), its loss stability) of each trial that has
  finished and has a value (not None)."""
  out = []
  for trial in study.trials:
    value = value_of(trial)
    if value is None or trial.status == study_data.UNFINISHED:
      continue
    out.append((trial, value, trial_stability(trial, thresholds)))
  return out


def warmup_command(study: study_data.Study, unstable_lr: float) -> str:
  """The warmup procedure at `unstable_lr`, from the same source study."""
  params = study.procedure["parameters"]
  source = (params.get("from_study") or {}).get("study_dir")
  flags = ["warmup", f"--config={study.config_path}",
           f"--study_dir={os.path.normpath(study.study_dir)}_warmup"]
  if source:
    flags.append(f"--from_study={source}")
  flags.append(f"--unstable_learning_rate={unstable_lr!r}")
  record = study_lib.read_study_json(study.study_dir) or {}
  return commands.command_line(commands.module_argv(
      "tuning_playbook.playbook", flags,
      trainer_module=record.get("trainer_module") or commands.DEFAULT_TRAINER,
      run=True))


def _figure(rows) -> Figure:
  fig = Figure(figsize=(7.5, 4), layout="constrained")
  ax = fig.add_subplot()
  cmap = matplotlib.colormaps["plasma"]
  for i, row in enumerate(rows):
    steps, losses = row["trial"].step_losses
    color = cmap(0.85 * i / max(1, len(rows) - 1))
    ax.plot(steps, losses, color=color, lw=0.8,
            label=f"{row['factor']:g}x (lr {fmt(row['learning_rate'])})")
    for spike in row["stability"].spikes:
      ax.plot([spike.step], [spike.peak], "x", color=color, ms=8)
    if row["evaluated"]:
      s, v = row["trial"].series("eval/validation/loss")
      if len(s):
        ax.plot(s, v, color=color, ls="--", lw=0.8,
                label=f"{row['factor']:g}x validation loss (every eval)")
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (per step)")
  ax.set_title("Learning rates above the best (x: spikes)")
  ax.legend(fontsize=7)
  return fig


def analyze(study: study_data.Study, save_figure: SaveFigure
            ) -> tuple[list[Finding], Section]:
  """Which learning rates above the best are unstable, where and how much."""
  params = study.procedure["parameters"]
  thresholds = findings_lib.Thresholds()
  best_lr = float(params["best_learning_rate"])
  rows = []
  for trial, lr, stability in examined_trials(study, _learning_rate,
                                              thresholds):
    factor = lr / best_lr
    rows.append({"trial": trial, "trial_id": trial.trial_id,
                 "learning_rate": lr, "factor": round(factor, 6),
                 "status": trial.status, "stability": stability,
                 "evaluated": math.isclose(factor, EVALUATED_FACTOR,
                                           rel_tol=1e-4)})
  rows.sort(key=lambda r: r["learning_rate"])
  unfinished = [t.trial_id for t in study.trials
                if t.status == study_data.UNFINISHED]
  table = [{"trial_id": r["trial_id"], "learning_rate": r["learning_rate"],
            "factor": r["factor"], "status": r["status"],
            **r["stability"].to_json()} for r in rows]
  details = {"best_learning_rate": best_lr, "steps": params["steps"],
             "eval_every": params["eval_every"], "trials": table,
             "unfinished": unfinished,
             "spike_factor": thresholds.spike_factor,
             "spike_jump": thresholds.spike_jump,
             "spike_window": thresholds.spike_window}
  found = [_result(study, rows, details)]
  image = save_figure(_figure(rows), "instability_check_losses",
                      "Per-step training loss at each learning rate (x: "
                      "spikes; dashed: validation loss of the 2x trial)")
  return found, _section(params, thresholds, rows, image)


def _result(study: study_data.Study, rows: list[dict[str, Any]],
            details: Mapping[str, Any]) -> Finding:
  """The finding: no trial finished, no instability, or where it starts."""
  params = study.procedure["parameters"]
  best_lr = details["best_learning_rate"]
  unstable = [r for r in rows if r["stability"].unstable]
  if not rows:
    return Finding(f"{NAME}/result", NAME, findings_lib.WARNING,
                   "No trial has finished yet: nothing to examine.", details)
  if not unstable:
    return Finding(
        f"{NAME}/result", NAME, findings_lib.INFO,
        f"No early instability: the training loss shows no spike, divergence "
        f"or stall at {_factors(rows)} the best "
        f"learning rate {fmt(best_lr)} over {params['steps']} steps. Warmup is "
        "not what limits the learning rate.",
        {**details, "early_instability": False, "unstable_learning_rate": None,
         "first_spike_step": None, "max_spike_size": None})
  first = unstable[0]
  spikes = [s for r in unstable for s in r["stability"].spikes]
  first_step = min([s.step for s in spikes] + [
      r["stability"].rising.start_step for r in unstable
      if r["stability"].rising is not None], default=None)
  biggest = max((s.size for s in spikes), default=None)
  where = "; ".join(_describe(r) for r in unstable)
  return Finding(
      f"{NAME}/result", NAME, findings_lib.WARNING,
      f"Early instability: {where}. The lowest unstable learning rate is "
      f"{fmt(first['learning_rate'])} ({first['factor']:g}x the best, "
      f"{fmt(best_lr)}). Try a learning rate warmup (the playbook's fix for "
      "early instability) with the command below.",
      {**details, "early_instability": True,
       "unstable_learning_rate": first["learning_rate"],
       "unstable_factor": first["factor"],
       "unstable_trials": [r["trial_id"] for r in unstable],
       "first_spike_step": first_step, "max_spike_size": biggest},
      command=warmup_command(study, first["learning_rate"]))


def _section(params: Mapping[str, Any], thresholds: findings_lib.Thresholds,
             rows: list[dict[str, Any]], image: Any) -> Section:
  """The report's section: the losses' figure and one row per trial."""
  notes = []
  evaluated = next((r for r in rows if r["evaluated"]), None)
  if evaluated is not None:
    s, _ = evaluated["trial"].series("eval/validation/loss")
    notes.append(f"The {EVALUATED_FACTOR:g}x trial ({evaluated['trial_id']}) "
                 f"was evaluated at {len(s)} steps (every "
                 f"{params['eval_every']}).")
  return Section(
      NAME, "Instability check: learning rates above the best",
      f"The best trial of the source study, {params['steps']} steps at "
      f"{', '.join(f'{f:g}' for f in params['lr_factors'])} x its learning "
      f"rate {fmt(float(params['best_learning_rate']))}. A spike: a step whose "
      f"loss is above "
      f"{thresholds.spike_factor:g}x the lowest {thresholds.spike_window}-step "
      f"median so far and above the median of the {thresholds.spike_window} "
      f"steps before it by {thresholds.spike_jump:g}x that median plus "
      f"{thresholds.noise_multiple:g} deviations; a stall: the loss ends no "
      "lower than it started; a rise: the training loss climbing over a "
      "sustained stretch (as in the training_loss_increasing check).",
      images=[image] if image else [], notes=notes,
      tables=[(["learning rate", "factor", "trial", "status", "spikes (step: "
                "peak, size)", "non-finite at", "stalled", "loss rising (steps)",
                "reproduce"],
               [[fmt(r["learning_rate"]), f"{r['factor']:g}x", r["trial_id"],
                 r["status"],
                 ", ".join(f"{s.step}: {fmt(s.peak)}, {s.size:.1f}x"
                           for s in r["stability"].spikes) or "none",
                 fmt(r["stability"].first_nonfinite_step or ""),
                 "yes" if r["stability"].stalled else "no",
                 ("" if r["stability"].rising is None else
                  f"{r['stability'].rising.start_step}-"
                  f"{r['stability'].rising.end_step}"),
                 Code(r["trial"].command)] for r in rows])])


def _factors(rows) -> str:
  return ", ".join(f"{r['factor']:g}x" for r in rows)


def _describe(row: Mapping[str, Any]) -> str:
  st = row["stability"]
  parts = []
  if st.spikes:
    parts.append(", ".join(f"a spike at step {s.step} to {fmt(s.peak)} "
                           f"({s.size:.1f}x)" for s in st.spikes[:3]))
  if st.first_nonfinite_step is not None:
    parts.append(f"diverged at step {st.first_nonfinite_step}")
  if st.rising is not None:
    parts.append(f"loss rising from {fmt(st.rising.low)} at step "
                 f"{st.rising.start_step} to {fmt(st.rising.peak)} by step "
                 f"{st.rising.end_step}")
  if st.stalled:
    parts.append(f"stalled (loss {fmt(st.first_loss)} -> {fmt(st.final_loss)})")
  return f"lr {fmt(row['learning_rate'])} ({row['factor']:g}x): " + ", ".join(parts)
