r"""Feasible batch sizes and the training throughput of each.

The playbook, "Determining the feasible batch sizes and estimating training
throughput": run short trials at increasing powers of 2 until one exceeds the
accelerator memory; while the accelerators are not saturated, doubling the
batch should (nearly) double the throughput.

  python -m tuning_playbook.playbook batch_size --config=configs/mnist1d_cnn.py \
      --study_dir=runs/cnn_batch --min_batch_size=16 --max_batch_size=4096 --run

Trials run one at a time (throughput is measured alone), smallest first; a
trial that fails with RESOURCE_EXHAUSTED or out of memory is recorded as "does
not fit" and the larger batch sizes are not launched. Throughput is the
trainer's `perf` block of summary.json: timed after compilation, evals
excluded. Each trial evaluates once, at its last step.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

from matplotlib.figure import Figure
import ml_collections

from tuning_playbook.analysis import findings as findings_lib
from tuning_playbook.analysis.findings import Finding, fmt
from tuning_playbook.analysis.report_html import Section
from tuning_playbook.analysis import study_data
from tuning_playbook.common import records
from tuning_playbook import config_schema
from tuning_playbook.procedures import Argument, Plan, ProcedureError
from tuning_playbook.procedures import SaveFigure

NAME = "batch_size"
DESCRIPTION = "Increasing powers of 2: which batch sizes fit, and their throughput."
BATCH = "batch_size"
OUT_OF_MEMORY = re.compile(r"RESOURCE_EXHAUSTED|out of memory|\bOOM\b",
                           re.IGNORECASE)
# Doubling the batch "nearly doubles" the throughput (time per step constant):
# at least this factor. Not the playbook's perfect scaling (steps halving).
PERFECT_SCALING = 1.8
_GRID = "powers of 2 in order, not a sample of a search space"
_SHORT = "a few steps to time each batch size, evaluated at the last"
GENERAL_CHECKS_LEFT_OUT = {
    "near_boundary": _GRID, "not_enough_trials": _GRID, "sampling": _GRID,
    "unfinished": "the batch sizes past one that does not fit are not launched; "
                  "its own finding names them",
    "infeasible": "a batch size that does not fit fails by design; its own "
                  "finding names it",
    "best_step_fraction": _SHORT, "best_step_early": _SHORT, "best_step_late": _SHORT,
    "still_improving": _SHORT, "saturated": _SHORT, "overfitting": _SHORT,
    "late_variance": _SHORT, "curves_ok": _SHORT, "eval_cadence": _SHORT,
}

ARGUMENTS = (
    Argument("min_batch_size", "int", 16, "Smallest batch size (a power of 2)."),
    Argument("max_batch_size", "int", 4096, "Largest batch size (a power of 2)."),
    Argument("steps", "int", 300, "Training steps per batch size."),
)


def _power_of_two(n: Any) -> bool:
  return isinstance(n, int) and n > 0 and n & (n - 1) == 0


def batch_sizes(args: Mapping[str, Any]) -> list[int]:
  lo, hi = args["min_batch_size"], args["max_batch_size"]
  for flag, value in (("min_batch_size", lo), ("max_batch_size", hi)):
    if not _power_of_two(value):
      raise ProcedureError(f"--{flag}={value}: must be a power of 2")
  if lo > hi:
    raise ProcedureError(f"--min_batch_size={lo} > --max_batch_size={hi}")
  return [2 ** i for i in range(lo.bit_length() - 1, hi.bit_length())]


def plan(config: ml_collections.ConfigDict, args: Mapping[str, Any],
         source: Any) -> Plan:
  """One short trial per batch size; evals only at the end."""
  del source
  steps = args["steps"]
  if steps is None or steps < 2:
    raise ProcedureError(f"--steps={steps}: must be >= 2")
  sizes = batch_sizes(args)
  eval_bs = config_schema.resolved_eval_batch_size(config)
  values = [{BATCH: b, "eval_batch_size": max(eval_bs, b)} for b in sizes]
  fixed = {"max_train_steps": steps, "eval_every_steps": steps,
           "log_every_steps": min(config.log_every_steps, steps),
           # Exactly `steps` steps, whatever the warmup would add.
           "optimizer.warmup_steps": 0}
  space = {"description": ("Feasible batch sizes and training throughput "
                           f"({sizes[0]}..{sizes[-1]}, {steps} steps each)."),
           "algorithm": "grid", "nuisance": {BATCH: {"values": values}},
           "fixed": fixed}
  return Plan(space, {"batch_sizes": sizes, "steps": steps})


def does_not_fit(record: Mapping[str, Any]) -> bool:
  """A failed trial whose reason says the accelerator memory ran out."""
  return (record.get("status") == records.FAILED
          and bool(OUT_OF_MEMORY.search(str(record.get("reason") or ""))))


def stop_rule(record: Mapping[str, Any]) -> bool:
  """Larger batch sizes are not launched once one does not fit."""
  return does_not_fit(record)


def throughput_row(trial: study_data.Trial) -> dict[str, Any]:
  """Batch size, what happened, and the summary's throughput figures."""
  # A trial that died before writing summary.json (out of memory at
  # start-up) is failed, with the log's last line.
  record = trial.record or records.trial_status(trial.run_dir)
  perf = (trial.summary or {}).get("perf") or {}
  steps, seconds = perf.get("steps_timed"), perf.get("seconds_timed")
  timed = bool(steps) and bool(seconds)
  if does_not_fit(record):
    fits = "does not fit"
  elif record["status"] == records.COMPLETED:
    fits = "fits"
  elif record["status"] == records.PENDING:
    fits = "not run"
  else:
    fits = record["status"]
  return {"batch_size": trial.params.get(BATCH), "trial_id": trial.trial_id,
          "status": record["status"], "reason": record["reason"], "fits": fits,
          "examples_per_second": perf.get("examples_per_second") if timed else None,
          "steps_per_second": steps / seconds if timed else None,
          "seconds_per_step": seconds / steps if timed else None,
          "steps_timed": steps, "seconds_timed": seconds}


def _scaling(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Each measured batch size's throughput over the previous one's."""
  measured = [r for r in rows if r["examples_per_second"]]
  for prev, row in zip(measured, measured[1:]):
    row["speedup"] = row["examples_per_second"] / prev["examples_per_second"]
    row["speedup_per_doubling"] = row["speedup"] ** (
        1 / max(1, (row["batch_size"] // prev["batch_size"]).bit_length() - 1))
  return measured


def next_command(study: study_data.Study, row: Mapping[str, Any]) -> str:
  """The learning-rate sweep at the batch size of the highest throughput."""
  trial = next(t for t in study.trials if t.trial_id == row["trial_id"])
  parent = os.path.dirname(os.path.normpath(study.study_dir)) or "."
  stem = os.path.splitext(os.path.basename(study.config_path.split(":")[0]))[0]
  return " ".join([
      "python", "-m", "tuning_playbook.playbook", "lr_sweep",
      f"--config={study.config_path}",
      f"--study_dir={os.path.join(parent, f'{stem}_lr_sweep')}",
      f"--config.batch_size={row['batch_size']}",
      f"--config.eval_batch_size={trial.params.get('eval_batch_size')}",
      "--run"])


def _figure(measured: list[dict[str, Any]]) -> Figure:
  fig = Figure(figsize=(9, 3.8), layout="constrained")
  left, right = fig.subplots(1, 2)
  sizes = [r["batch_size"] for r in measured]
  left.plot(sizes, [r["examples_per_second"] for r in measured], "o-",
            label="measured")
  first = measured[0]
  left.plot(sizes, [first["examples_per_second"] * b / first["batch_size"]
                    for b in sizes], "--", color="gray",
            label="throughput doubling")
  left.set_ylabel("examples / s")
  right.plot(sizes, [1e3 * r["seconds_per_step"] for r in measured], "o-")
  right.set_ylabel("ms / step")
  for ax in (left, right):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
  left.set_yscale("log")
  left.legend(fontsize=8)
  return fig


def _throughput_scaling(study: study_data.Study,
                        measured: list[dict[str, Any]]) -> Finding:
  """Where doubling the batch (nearly) doubles the throughput."""
  end = measured[0]["batch_size"]
  for row in measured[1:]:
    if row["speedup_per_doubling"] < PERFECT_SCALING:
      break
    end = row["batch_size"]
  best = max(measured, key=lambda r: r["examples_per_second"])
  return Finding(
      f"{NAME}/throughput_scaling", NAME, findings_lib.INFO,
      f"Throughput (nearly) doubles with the batch size (x{PERFECT_SCALING:g} "
      f"or more per doubling: the time per step stays constant) from "
      f"{measured[0]['batch_size']} up to {end}"
      + ("" if end == measured[-1]["batch_size"] else
         f"; beyond it the devices are saturated or a bottleneck (input, "
         f"synchronization) limits it") + f". The highest throughput, "
      f"{fmt(best['examples_per_second'])} examples/s, is at batch size "
      f"{best['batch_size']}. Throughput is half of training time: perfect "
      "scaling, in the playbook's words, is the steps to a result halving "
      "when the batch doubles, which `playbook batch_size_time` measures "
      "(each batch size with its own learning rate).",
      {"throughput_doubles_from": measured[0]["batch_size"],
       "throughput_doubles_to": end, "scaling_threshold": PERFECT_SCALING,
       "speedups": {r["batch_size"]: r["speedup"] for r in measured[1:]},
       "max_throughput_batch_size": best["batch_size"],
       "max_examples_per_second": best["examples_per_second"]},
      command=next_command(study, best))


def analyze(study: study_data.Study, save_figure: SaveFigure
            ) -> tuple[list[Finding], Section]:
  """The throughput table, where throughput doubles and the largest batch
  that fits."""
  rows = sorted((throughput_row(t) for t in study.trials),
                key=lambda r: r["batch_size"] or 0)
  measured = _scaling(rows)
  found = []
  table = [{k: v for k, v in r.items()} for r in rows]
  found.append(Finding(
      f"{NAME}/throughput", NAME, findings_lib.INFO,
      "Training throughput per batch size (after compilation, evals "
      "excluded): " + "; ".join(
          f"{r['batch_size']}: " + (f"{fmt(r['examples_per_second'])} "
                                    f"examples/s, {fmt(1e3 * r['seconds_per_step'])}"
                                    " ms/step" if r["examples_per_second"]
                                    else r["fits"]) for r in rows) + ".",
      {"rows": table}))
  fitting = [r["batch_size"] for r in rows if r["fits"] == "fits"]
  too_big = [r["batch_size"] for r in rows if r["fits"] == "does not fit"]
  not_run = [r["batch_size"] for r in rows if r["fits"] == "not run"]
  largest = max(fitting) if fitting else None
  found.append(Finding(
      f"{NAME}/largest_feasible", NAME,
      findings_lib.INFO if largest else findings_lib.WARNING,
      (f"Largest feasible batch size: {largest}" if largest else
       "No batch size completed") +
      (f"; {min(too_big)} does not fit in memory" if too_big else
       "; every batch size tried fits (raise --max_batch_size to find the "
       "limit)" if largest and not not_run else "") +
      (f"; not launched: {', '.join(map(str, not_run))}" if not_run else "")
      + ".",
      {"largest_feasible": largest, "does_not_fit": too_big,
       "not_launched": not_run, "feasible": fitting}))
  if len(measured) >= 2:
    found.append(_throughput_scaling(study, measured))
  image = (save_figure(_figure(measured), "batch_size_throughput",
                       "Examples/s (dashed: throughput doubling with the "
                       "batch, from the smallest) and time per step against "
                       "the batch size")
           if measured else None)
  section = Section(
      NAME, "Batch size: feasibility and training throughput",
      "Short trials at increasing powers of 2, one at a time. Throughput is "
      "measured after compilation with evals excluded (summary.json's perf). "
      "While the accelerators are not saturated, doubling the batch size "
      "should nearly double the throughput (time per step constant).",
      images=[image] if image else [],
      tables=[(["batch size", "trial", "fits", "examples/s", "steps/s",
                "ms/step", "x previous"],
               [[str(r["batch_size"]), r["trial_id"], r["fits"],
                 fmt(r["examples_per_second"]) if r["examples_per_second"] else "",
                 fmt(r["steps_per_second"]) if r["steps_per_second"] else "",
                 fmt(1e3 * r["seconds_per_step"]) if r["seconds_per_step"] else "",
                 fmt(r["speedup"]) if r.get("speedup") else ""]
                for r in rows])])
  return found, section
