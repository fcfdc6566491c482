r"""The shortest learning rate warmup that makes a high learning rate stable.

The playbook, "How to apply learning rate warmup": given the learning rate at
which the model becomes unstable (`unstable_base_learning_rate`, e.g. from
the instability_check procedure), ramp up from 0 to a `base_learning_rate`
10x it (100x with --lr_factor=100) over `warmup_steps`, then train at that
constant rate for `post_warmup_steps = 2 * warmup_steps`; sweep warmup_steps
over orders of magnitude up to 10% of max_train_steps, and prepend the
shortest one that does not blow up training to the baseline's schedule.

  python -m tuning_playbook.playbook warmup --config=configs/mnist1d_cnn.py \
      --study_dir=runs/cnn_warmup --from_study=runs/cnn_study \
      --unstable_learning_rate=0.28 --run --parallel=2

Each trial's max_train_steps is its post-warmup length and the warmup is
prepended (study_presets.warmup_study). "Stays feasible": completed, with no
loss spike, non-finite loss or stall in its per-step training loss
(tuning_playbook/analysis/loss_spikes.py).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from matplotlib.figure import Figure
import ml_collections

from tuning_playbook.analysis import findings as findings_lib
from tuning_playbook.analysis.findings import Finding, fmt, percent
from tuning_playbook.analysis import next_steps
from tuning_playbook.analysis.report_html import Code, Section
from tuning_playbook.analysis import study_data
from tuning_playbook.common import records
from tuning_playbook.procedures import Argument, Plan, ProcedureError
from tuning_playbook.procedures import from_study
from tuning_playbook.procedures import instability_check
from tuning_playbook.procedures import SaveFigure
from tuning_playbook.studies import commands as commands_lib
from tuning_playbook.studies import study as study_lib
from tuning_playbook import study_presets

NAME = "warmup"
DESCRIPTION = "Warmup lengths at 10x an unstable learning rate: the shortest stable."
WARMUP_KEY = "optimizer.warmup_steps"
MAX_FRACTION = 0.1  # The longest warmup tried, of the baseline's max_train_steps.
FLAG_FRACTION = 0.05  # A warmup longer than this share is flagged.
POST_WARMUP_FACTOR = 2

_GRID = "warmup lengths on a grid, not a sample"
# Those of the instability check (short runs made unstable on purpose), on
# a grid of warmup lengths.
GENERAL_CHECKS_LEFT_OUT = {
    **instability_check.GENERAL_CHECKS_LEFT_OUT,
    "near_boundary": _GRID, "not_enough_trials": _GRID, "sampling": _GRID,
}

ARGUMENTS = (
    Argument("unstable_learning_rate", "float", None,
             "The learning rate at which training becomes unstable."),
    Argument("lr_factor", "float", 10.0,
             "base_learning_rate = this x --unstable_learning_rate (10 or 100)."),
    Argument("warmup_steps", "floats", None,
             "The warmup lengths (default 0, 10, 30, 100, ... up to 10% of "
             "max_train_steps)."),
)


def default_warmups(max_train_steps: int) -> list[int]:
  """0, then 1 and 3 times each power of 10 from 10 up to 10% of training."""
  top, out, w = int(MAX_FRACTION * max_train_steps), [0], 10
  while w <= top:
    out += [s for s in (w, 3 * w) if s <= top]
    w *= 10
  return out


def plan(config: ml_collections.ConfigDict, args: Mapping[str, Any],
         source: from_study.Source | None) -> Plan:
  """The warmup_study preset, with a 0-step warmup as the control."""
  del source
  unstable, factor = args["unstable_learning_rate"], args["lr_factor"]
  if unstable is None or unstable <= 0:
    raise ProcedureError(f"--unstable_learning_rate={unstable}: give the "
                         "positive learning rate at which training is unstable")
  if factor is None or factor < 1:
    raise ProcedureError(f"--lr_factor={factor}: must be >= 1 (10 or 100)")
  baseline = int(config.max_train_steps)
  if args["warmup_steps"]:
    warmups = sorted({int(w) for w in args["warmup_steps"]})
  else:
    warmups = default_warmups(baseline)
  nonzero = [w for w in warmups if w > 0]
  if not nonzero or warmups[0] < 0:
    raise ProcedureError(
        f"--warmup_steps: need at least one positive length (max_train_steps="
        f"{baseline} leaves none of 10 steps up to {percent(MAX_FRACTION)})")
  space = study_presets.warmup_study(
      unstable, warmup_steps=nonzero, learning_rate_factors=(factor,),
      post_warmup_factor=POST_WARMUP_FACTOR)
  if 0 in warmups:  # The control: no warmup, as long as the longest trial.
    space["scientific"]["warmup"]["values"].insert(0, {
        WARMUP_KEY: 0, "max_train_steps": (POST_WARMUP_FACTOR + 1) * nonzero[-1]})
  space["name"] = f"{config.workload}/{NAME}"
  space["fixed"].update({"eval_every_steps": max(1, nonzero[0]),
                         "num_best_checkpoints": 1})
  parameters = {"unstable_learning_rate": unstable, "lr_factor": factor,
                "base_learning_rate": float(space["fixed"][
                    "optimizer.learning_rate"]),
                "warmup_steps": warmups,
                "baseline_max_train_steps": baseline,
                "baseline_warmup_steps": int(config.optimizer.warmup_steps)}
  return Plan(space, parameters)


def _warmup(trial: study_data.Trial) -> int | None:
  value = ((trial.config or {}).get("optimizer") or {}).get("warmup_steps")
  return int(value) if isinstance(value, (int, float)) else None


def baseline_command(study: study_data.Study, warmup: int) -> str | None:
  """The baseline with the warmup prepended: the source study (or its best
  trial, when the study searches the warmup) with the override."""
  params = study.procedure["parameters"]
  override = {f"--config.{WARMUP_KEY}": str(warmup),
              "--config.optimizer.warmup_mode": "prepended"}
  source_dir = from_study.find_study_dir(params)
  if source_dir is not None:
    source = study_data.load_study(source_dir)
    commands = next_steps.StudyCommands.of(source)
    target = f"{os.path.normpath(source_dir)}_warmup{warmup}"
    if not commands.searched(WARMUP_KEY) and commands.argv:
      return next_steps.with_flags(commands_lib.command_line(commands.argv),
                                   {"--study_dir": target, **override})
    best = source.best_trial()
    return next_steps.with_flags(best.command, {"--workdir": target, **override})
  record = study_lib.read_study_json(study.study_dir) or {}
  argv = commands_lib.module_argv(
      record.get("trainer_module") or commands_lib.DEFAULT_TRAINER,
      [f"--config={study.config_path}",
       f"--workdir={os.path.normpath(study.study_dir)}_baseline_warmup{warmup}"],
      overrides=record.get("config_overrides") or {})
  return next_steps.with_flags(commands_lib.command_line(argv), override)


def _figure(rows) -> Figure:
  fig = Figure(figsize=(7.5, 4), layout="constrained")
  ax = fig.add_subplot()
  for row in rows:
    steps, losses = row["trial"].step_losses
    ax.plot(steps, losses, lw=0.8, label=f"warmup {row['warmup_steps']}"
            + ("" if row["feasible"] else " (unstable)"))
  ax.set_xscale("symlog", linthresh=10)
  ax.set_yscale("log")
  ax.set_xlabel("step (warmup, then 2x as many at the base rate)")
  ax.set_ylabel("training loss (per step)")
  ax.legend(fontsize=7)
  return fig


def analyze(study: study_data.Study, save_figure: SaveFigure
            ) -> tuple[list[Finding], Section]:
  """The shortest feasible warmup, and how to prepend it to the baseline."""
  params = study.procedure["parameters"]
  thresholds = findings_lib.Thresholds()
  baseline = int(params["baseline_max_train_steps"])
  rows = []
  for trial, w, stability in instability_check.examined_trials(
      study, _warmup, thresholds):
    rows.append({"trial": trial, "trial_id": trial.trial_id, "warmup_steps": w,
                 "status": trial.status, "stability": stability,
                 "feasible": (trial.status == records.COMPLETED
                              and not stability.unstable),
                 "best_value": trial.best_value})
  rows.sort(key=lambda r: r["warmup_steps"])
  table = [{"trial_id": r["trial_id"], "warmup_steps": r["warmup_steps"],
            "status": r["status"], "feasible": r["feasible"],
            "best_value": r["best_value"], **r["stability"].to_json()}
           for r in rows]
  details = {"base_learning_rate": params["base_learning_rate"],
             "unstable_learning_rate": params["unstable_learning_rate"],
             "lr_factor": params["lr_factor"],
             "baseline_max_train_steps": baseline,
             "flag_fraction": FLAG_FRACTION, "trials": table}
  feasible = [r for r in rows if r["feasible"]]
  found = []
  base = fmt(params["base_learning_rate"])
  if not rows:
    found.append(Finding(f"{NAME}/result", NAME, findings_lib.WARNING,
                         "No trial has finished yet: nothing to examine.",
                         details))
  elif not feasible:
    longest = rows[-1]["warmup_steps"]
    found.append(Finding(
        f"{NAME}/result", NAME, findings_lib.WARNING,
        f"No warmup up to {longest} steps keeps training at base learning "
        f"rate {base} ({fmt(params['lr_factor'])}x the unstable "
        f"{fmt(params['unstable_learning_rate'])}) free of spikes and "
        "divergence. Warmup alone does not make this rate usable: try "
        "gradient clipping, or a base rate only a few times the unstable one.",
        {**details, "shortest_feasible_warmup": None, "override": None}))
  else:
    best = feasible[0]
    w = best["warmup_steps"]
    fraction = w / baseline
    flagged = fraction > FLAG_FRACTION
    override = f"--config.{WARMUP_KEY}={w}"
    message = (
        f"The shortest warmup that stays feasible at base learning rate {base} "
        f"({fmt(params['lr_factor'])}x the unstable "
        f"{fmt(params['unstable_learning_rate'])}) is {w} steps "
        f"({percent(fraction)} of the baseline's max_train_steps={baseline}; "
        f"trial {best['trial_id']}). Prepend it to the baseline's schedule "
        f"with {override} (warmup_mode=prepended keeps its max_train_steps) "
        "and compare with retrospective checkpoint selection.")
    if flagged:
      message += (f" It is longer than {percent(FLAG_FRACTION)} of training: "
                  "expensive; gradient clipping may fix the instability more "
                  "cheaply.")
    found.append(Finding(
        f"{NAME}/result", NAME,
        findings_lib.WARNING if flagged else findings_lib.INFO, message,
        {**details, "shortest_feasible_warmup": w, "fraction": fraction,
         "above_flag_fraction": flagged, "trial_id": best["trial_id"],
         "override": override},
        command=baseline_command(study, w)))
  image = save_figure(_figure(rows), "warmup_losses",
                      "Per-step training loss of each warmup length")
  return found, _section(base, rows, image)


def _section(base: str, rows: list[dict[str, Any]], image: Any) -> Section:
  """The report's section: the losses' figure and one row per trial."""
  return Section(
      NAME, "Warmup: the shortest stable warmup",
      f"Each trial warms up from 0 to the base learning rate {base} over its "
      f"warmup_steps, then trains {POST_WARMUP_FACTOR}x as many steps at it. "
      "Feasible: completed with no loss spike, non-finite loss or stall.",
      images=[image] if image else [],
      tables=[(["warmup steps", "trial", "status", "feasible", "spikes",
                "best value", "reproduce"],
               [[str(r["warmup_steps"]), r["trial_id"], r["status"],
                 "yes" if r["feasible"] else "no",
                 ", ".join(f"{s.step}: {s.size:.1f}x"
                           for s in r["stability"].spikes) or "none",
                 fmt(r["best_value"]), Code(r["trial"].command)]
                for r in rows])])
