r"""Batch size by time to result: steps to a target x time per step.

The playbook, "Choosing the batch size to minimize training time": training
time = (time per step) x (total number of steps). Perfect scaling means the
steps to a result halve when the batch size doubles; it holds up to some
batch size, past which larger batches need as many steps (or more). Each
batch size needs its own learning rate, so each gets a few trials around its
scaled rate.

  python -m tuning_playbook.playbook batch_size_time \
      --config=configs/mnist1d_cnn.py --study_dir=runs/cnn_batch_time \
      --batch_sizes=64,128,256,512 --run

For each batch size B: `--lr_factors` x the config's learning rate scaled to
B (`--lr_scaling`: linear for SGD and momentum, square root for Adam-like
optimizers, by default), evaluated every `--eval_every` steps. The finding:
for each batch size, the fewest steps any of its trials needs to reach the
target (`--target`; default the worst of the batch sizes' best values, so
that every batch size reaches it), the measured time per step, and their
product; the largest batch size that still scales (steps at most
1/`STEPS_SCALING` of the previous per doubling), and the fastest batch size.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from matplotlib.figure import Figure
import ml_collections

from tuning_playbook.analysis import findings as findings_lib
from tuning_playbook.analysis.findings import Finding, fmt
from tuning_playbook.analysis.report_html import Section
from tuning_playbook.analysis import study_data
from tuning_playbook import config_schema
from tuning_playbook.procedures import Argument, Plan, ProcedureError
from tuning_playbook.procedures import batch_size as batch_size_lib
from tuning_playbook.procedures import SaveFigure

NAME = "batch_size_time"
DESCRIPTION = ("Batch sizes by training time: steps to a target (each with its "
               "learning rate re-tuned) x time per step.")
RUN = "run"
# Doubling the batch "nearly halves" the steps: by at least this factor.
STEPS_SCALING = 1.8
LR_SCALINGS = ("auto", "linear", "sqrt", "none")
_ADAPTIVE_OPTIMIZERS = ("adam", "adamw", "nadam", "lamb")
_GRID = "a grid of batch sizes and learning rates, not a sample of a search space"
GENERAL_CHECKS_LEFT_OUT = {"near_boundary": _GRID, "not_enough_trials": _GRID,
                           "sampling": _GRID}

ARGUMENTS = (
    Argument("batch_sizes", "floats", None,
             "Batch sizes (default: the config's x 1, 2 and 4)."),
    Argument("lr_factors", "floats", (0.5, 1.0, 2.0),
             "Learning rates tried per batch size, times its scaled rate."),
    Argument("lr_scaling", "string", "auto",
             "How the rate follows the batch size: linear, sqrt, none, or auto "
             "(sqrt for Adam-like optimizers, linear otherwise)."),
    Argument("target", "float", None,
             "The result to reach (default: the worst of the batch sizes' "
             "best values)."),
    Argument("eval_every", "int", None,
             "Eval period in steps: the resolution of the steps to the target "
             "(default: max_train_steps / 20)."),
)


def _scaling_power(config: ml_collections.ConfigDict, how: str) -> float:
  if how not in LR_SCALINGS:
    raise ProcedureError(f"--lr_scaling={how}: allowed: {', '.join(LR_SCALINGS)}")
  if how == "auto":
    how = "sqrt" if config.optimizer.name in _ADAPTIVE_OPTIMIZERS else "linear"
  return {"linear": 1.0, "sqrt": 0.5, "none": 0.0}[how]


def _batch_sizes(config: ml_collections.ConfigDict,
                 args: Mapping[str, Any]) -> list[int]:
  given = args["batch_sizes"]
  if given is None:
    return [int(config.batch_size) * k for k in (1, 2, 4)]
  if len(set(given)) < 2 or any(b < 1 or b != int(b) for b in given):
    raise ProcedureError(f"--batch_sizes={','.join(f'{b:g}' for b in given)}: "
                         "at least two positive integers")
  return sorted({int(b) for b in given})


def plan(config: ml_collections.ConfigDict, args: Mapping[str, Any],
         source: Any) -> Plan:
  """One trial per (batch size, learning rate), evaluated often."""
  del source
  sizes = _batch_sizes(config, args)
  power = _scaling_power(config, args["lr_scaling"])
  factors = list(args["lr_factors"] or ())
  if not factors or any(f <= 0 for f in factors):
    raise ProcedureError("--lr_factors: positive numbers, at least one")
  steps = int(config.max_train_steps)
  eval_every = args["eval_every"] or max(1, steps // 20)
  if eval_every < 1 or eval_every > steps:
    raise ProcedureError(f"--eval_every={eval_every}: between 1 and "
                         f"max_train_steps={steps}")
  base_lr, base_batch = float(config.optimizer.learning_rate), int(config.batch_size)
  eval_bs = config_schema.resolved_eval_batch_size(config)
  runs = []
  for b in sizes:
    scaled = base_lr * (b / base_batch) ** power
    runs += [{"batch_size": b, "eval_batch_size": max(eval_bs, b),
              "optimizer.learning_rate": scaled * f} for f in factors]
  space = {"description": (f"Training time per batch size ({', '.join(map(str, sizes))}), "
                           f"{len(factors)} learning rates each."),
           "algorithm": "grid", "nuisance": {RUN: {"values": runs}},
           "fixed": {"eval_every_steps": eval_every}}
  return Plan(space, {"batch_sizes": sizes, "lr_factors": factors,
                      "lr_scaling_power": power, "target": args["target"],
                      "eval_every": eval_every})


def steps_to_target(trial: study_data.Trial, metric: str, mode: str,
                    target: float) -> int | None:
  """The first eval step whose `metric` reaches `target`."""
  for row in trial.metrics:
    value = row.get(metric)
    if value is not None and math.isfinite(value) and (
        value <= target if mode == "min" else value >= target):
      return int(row["step"])
  return None


def _default_target(by_batch: Mapping[int, list[study_data.Trial]], mode: str
                    ) -> float | None:
  """The worst of the batch sizes' best values: every batch size reaches it."""
  pick = min if mode == "min" else max
  bests = [pick(values) for values in (
      [t.best_value for t in trials if t.best_value is not None]
      for trials in by_batch.values()) if values]
  return (max if mode == "min" else min)(bests) if bests else None


def by_batch_size(study: study_data.Study) -> dict[int, list[study_data.Trial]]:
  out: dict[int, list[study_data.Trial]] = {}
  for t in study.trials:
    out.setdefault(int(t.params["batch_size"]), []).append(t)
  return out


def time_rows(study: study_data.Study, target: float) -> list[dict[str, Any]]:
  """Per batch size: its fastest trial to the target, steps, time per step
  and training time (None where no trial reaches it)."""
  metric, mode = study.objective.metric, study.objective.mode
  by_batch = by_batch_size(study)
  rows = []
  for b in sorted(by_batch):
    reached = [(s, t) for t in by_batch[b]
               if (s := steps_to_target(t, metric, mode, target)) is not None]
    row = {"batch_size": b, "trials": len(by_batch[b]), "steps": None,
           "trial_id": None, "learning_rate": None, "seconds_per_step": None,
           "training_seconds": None}
    if reached:
      steps, trial = min(reached, key=lambda p: p[0])
      perf = (trial.summary or {}).get("perf") or {}
      per_step = (perf["seconds_timed"] / perf["steps_timed"]
                  if perf.get("steps_timed") and perf.get("seconds_timed") else None)
      row.update(steps=steps, trial_id=trial.trial_id,
                 learning_rate=trial.params.get("optimizer.learning_rate"),
                 seconds_per_step=per_step,
                 training_seconds=steps * per_step if per_step else None)
    rows.append(row)
  return rows


def largest_scaling(rows: Sequence[Mapping[str, Any]]) -> int | None:
  """The largest batch size up to which the steps (nearly) halve per doubling."""
  measured = [r for r in rows if r["steps"]]
  if not measured:
    return None
  end = measured[0]["batch_size"]
  for prev, row in zip(measured, measured[1:]):
    doublings = math.log2(row["batch_size"] / prev["batch_size"])
    if (prev["steps"] / row["steps"]) ** (1 / doublings) < STEPS_SCALING:
      break
    end = row["batch_size"]
  return end


def _figure(rows: Sequence[Mapping[str, Any]], scaling_to: int | None) -> Figure:
  fig = Figure(figsize=(9, 3.8), layout="constrained")
  left, right = fig.subplots(1, 2)
  measured = [r for r in rows if r["steps"]]
  sizes = [r["batch_size"] for r in measured]
  left.plot(sizes, [r["steps"] for r in measured], "o-", label="measured")
  if measured:
    first = measured[0]
    left.plot(sizes, [first["steps"] * first["batch_size"] / b for b in sizes],
              "--", color="gray", label="perfect scaling (steps halve)")
  if scaling_to:
    left.axvline(scaling_to, color="green", alpha=0.4,
                 label=f"scales up to {scaling_to}")
  left.set_ylabel("steps to the target")
  timed = [r for r in measured if r["training_seconds"]]
  right.plot([r["batch_size"] for r in timed],
             [r["training_seconds"] for r in timed], "o-")
  right.set_ylabel("training time to the target (s)")
  for ax in (left, right):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
  left.set_yscale("log")
  left.legend(fontsize=8)
  return fig


def _message(rows, target, metric, scaling_to, fastest) -> str:
  parts = [f"{r['batch_size']}: " + (
      f"{r['steps']} steps (learning rate {fmt(r['learning_rate'])})"
      + (f" x {fmt(1e3 * r['seconds_per_step'])} ms = "
         f"{fmt(r['training_seconds'])} s" if r["training_seconds"] else "")
      if r["steps"] else "never reaches it") for r in rows]
  text = (f"Steps to {metric} = {fmt(target)} with each batch size's best "
          f"learning rate: " + "; ".join(parts) + ". ")
  measured = [r["batch_size"] for r in rows if r["steps"]]
  if scaling_to is not None and scaling_to > measured[0]:
    text += (f"Perfect scaling (the steps halve when the batch doubles, by "
             f"x{STEPS_SCALING:g} or more) holds up to batch size {scaling_to}. ")
  elif len(measured) > 1:
    text += (f"Perfect scaling (the steps halve when the batch doubles, by "
             f"x{STEPS_SCALING:g} or more) does not hold past batch size "
             f"{measured[0]}. ")
  if fastest is not None:
    text += (f"The shortest training time is at batch size "
             f"{fastest['batch_size']}: use it, and re-tune the other "
             "hyperparameters there (they were tuned for another batch size).")
  return text


def analyze(study: study_data.Study, save_figure: SaveFigure
            ) -> tuple[list[Finding], Section]:
  """Steps to the target, time per step and training time per batch size."""
  params = study.procedure["parameters"]
  metric, mode = study.objective.metric, study.objective.mode
  target = params.get("target")
  if target is None:
    target = _default_target(by_batch_size(study), mode)
  if target is None:
    finding = Finding(f"{NAME}/time_to_result", NAME, findings_lib.WARNING,
                      f"No trial finished with a finite {metric}: run the study.",
                      {"metric": metric})
    return [finding], Section(NAME, "Batch size by time to result", "")
  rows = time_rows(study, target)
  scaling_to = largest_scaling(rows)
  timed = [r for r in rows if r["training_seconds"]]
  fastest = min(timed, key=lambda r: r["training_seconds"]) if timed else None
  finding = Finding(
      f"{NAME}/time_to_result", NAME, findings_lib.INFO,
      _message(rows, target, metric, scaling_to, fastest),
      {"metric": metric, "mode": mode, "target": target, "rows": rows,
       "perfect_scaling_to": scaling_to, "steps_scaling": STEPS_SCALING,
       "fastest_batch_size": fastest["batch_size"] if fastest else None},
      command=(batch_size_lib.next_command(study, fastest) if fastest else None))
  image = save_figure(_figure(rows, scaling_to), "batch_size_time",
                      "Steps to the target against the batch size (dashed: "
                      "perfect scaling), and the training time")
  section = Section(
      NAME, "Batch size by time to result",
      "Each batch size with its own learning rates; the steps to reach the "
      "target x the time per step is the training time the playbook "
      "minimizes.", images=[image] if image else [],
      tables=[(["batch size", "trials", "steps to target", "learning rate",
                "ms/step", "training time (s)"],
               [[str(r["batch_size"]), str(r["trials"]),
                 str(r["steps"]) if r["steps"] else "not reached",
                 fmt(r["learning_rate"]) if r["learning_rate"] else "",
                 fmt(1e3 * r["seconds_per_step"]) if r["seconds_per_step"] else "",
                 fmt(r["training_seconds"]) if r["training_seconds"] else ""]
                for r in rows])])
  return [finding], section
