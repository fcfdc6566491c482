"""The report's general sections (axis plots, isolation plots, curves,
gradients, search space, sampling, leaderboard), each with its figures,
drawn into the report directory by a `FigureWriter`.

  writer = FigureWriter(report_dir)
  section = axis_section(study, writer)  # writer.files: the PNGs written.
"""

from __future__ import annotations

import os
import re
from typing import Any

from tuning_playbook.analysis import bootstrap
from tuning_playbook.analysis import curve_checks
from tuning_playbook.analysis import curve_plots
from tuning_playbook.analysis import isolation
from tuning_playbook.analysis import plots
from tuning_playbook.analysis.report_html import Code, Image, Link, Section
from tuning_playbook.analysis import throughput_checks

def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class FigureWriter:
  """Saves figures into the report directory and remembers their names."""

  def __init__(self, report_dir: str):
    self.report_dir = report_dir
    self.files: list[str] = []

  def image(self, fig, name: str, caption: str) -> Image | None:
    if fig is None:
      return None
    file = _safe(name) + ".png"
    plots.save(fig, os.path.join(self.report_dir, file))
    self.files.append(file)
    return Image(file, caption)


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return "" if value is None else str(value)


def axis_section(study, writer) -> Section:
  dims = study.varied_dimensions()
  images = [writer.image(plots.axis_plot(study, d), f"axis_{d.name}",
                         f"{d.name}: best {study.objective.metric} of each trial "
                         f"(red X: infeasible, dashed: search-space bounds)")
            for d in dims]
  return Section(
      "axis", "1. Basic hyperparameter axis plots",
      "Each point is one trial: the best value of the objective it reached over "
      "training, against one hyperparameter. Best points crowding an edge of the "
      "range mean the search space is too narrow there; red X's are infeasible "
      "trials (diverged or failed), drawn past the worst feasible value.",
      images=[i for i in images if i],
      notes=[] if dims else ["No hyperparameter varies between the trials."])


def isolation_section(study, writer) -> Section:
  dims = study.scientific_dimensions()
  notes = []
  if not dims:
    dims = study.varied_dimensions()
    notes.append("No hyperparameter is marked \"role\": \"scientific\" in "
                 "study.json; each varied hyperparameter is shown with the others "
                 "optimized away.")
  images = [writer.image(plots.isolation_plot(study, d), f"isolation_{d.name}",
                         f"{d.name}: best trial per value, other hyperparameters "
                         f"optimized away") for d in dims]
  return Section(
      "isolation", "2. Isolation plots",
      "For each value of a scientific hyperparameter, the best trial over all "
      "nuisance hyperparameters: an apples-to-apples comparison of the scientific "
      "values. Continuous hyperparameters are bucketed along their scale and the "
      "best trial of each bucket is kept.",
      images=[i for i in images if i], notes=notes)


def _flag_text(flags: curve_checks.CurveFlags | None) -> str:
  if flags is None or not flags.names():
    return "none"
  parts = []
  if flags.overfitting:
    parts.append(f"overfitting (rises {flags.overfitting['rise']:.3g} after step "
                 f"{flags.overfitting['best_step']})")
  if flags.late_variance:
    noise = ", ".join(f"{k} {v:.0%}" for k, v in
                      flags.late_variance["relative_noise"].items())
    parts.append(f"high late variance ({noise})")
  if flags.still_improving:
    parts.append(f"still improving ({flags.still_improving['fraction_of_improvement']:.0%}"
                 " of its improvement in the last 25%)")
  if flags.saturated:
    parts.append(f"saturated by {flags.saturated['fraction']:.0%} of training")
  return "; ".join(parts)


def curves_section(study, writer, groups, flags) -> Section:
  highlight = [t.trial_id for t in study.feasible_trials()[:len(curve_plots.COLORS)]]
  images = [writer.image(curve_plots.all_curves(study, highlight[:3]), "curves_all",
                         f"{study.objective.metric} of every trial")]
  tables = []
  for i, (title, trials) in enumerate(groups):
    images.append(writer.image(curve_plots.training_curves(study, title, trials),
                               f"curves_{i:02d}", f"Training curves: {title}"))
  rows = []
  for title, trials in groups:
    for t in trials:
      rows.append([title, t.trial_id, _fmt(t.best_value), _fmt(t.best_step),
                   _flag_text(flags.get(t.trial_id))])
  if rows:
    tables.append((["group", "trial", "best", "best step", "flags"], rows))
  return Section(
      "curves", "3. Training curves",
      "Training (fixed training subset, dashed) and validation (solid) metric and "
      "loss vs step for the best few trials of each scientific value. Flags: "
      "problematic overfitting (validation gets worse after its best step), high "
      "step-to-step variance late in training, still improving at the end "
      "(compute-bound: train longer), saturated long before the end (not "
      "compute-bound: fewer steps would do). A training loss that rises over "
      "a sustained stretch usually indicates a bug.",
      images=[i for i in images if i], tables=tables,
      notes=[] if groups else ["No feasible trial to show."])


def gradient_section(study, writer, stats) -> Section:
  images, rows = [], []
  by_id = {t.trial_id: t for t in study.trials}
  for s in stats:
    images.append(writer.image(curve_plots.gradient_norms(by_id[s.trial_id], s),
                               f"grad_{s.trial_id}", f"Trial {s.trial_id}"))
    rows.append([s.trial_id, str(s.num_steps), _fmt(s.median),
                 _fmt(s.suggested_threshold),
                 f"{s.fraction_clipped_at_suggestion:.0%}",
                 _fmt(s.configured_threshold) if s.configured_threshold else "off",
                 "" if s.fraction_clipped_configured is None
                 else f"{s.fraction_clipped_configured:.0%}",
                 str(len(s.outlier_steps))])
  table = (["trial", "steps", "median norm", "90th percentile (suggested clip)",
            "clipped at suggestion", "grad_clip_norm", "clipped by grad_clip_norm",
            "spikes"], rows)
  return Section(
      "gradients", "4. Gradient norms",
      "The unclipped global gradient norm of the best trials, per step and as a "
      "histogram over all steps. A clipping threshold just above the typical norm "
      "(the 90th percentile) tames outlier gradients; clipping more than half the "
      "steps is extremely aggressive and is better replaced by a lower learning "
      "rate.",
      images=[i for i in images if i], tables=[table] if rows else [],
      notes=[] if rows else ["No trial logged gradient norms."])


def search_space_section(study, writer, thresholds) -> Section:
  images = [
      writer.image(plots.coverage_plot(study, thresholds), "coverage",
                   "Each trial's position in every numeric dimension (shaded: "
                   "within the boundary margin)"),
      writer.image(plots.best_step_plot(study, thresholds), "best_step",
                   "Retrospective best step as a fraction of total_train_steps "
                   "(max_train_steps plus a prepended warmup)")]
  return Section(
      "search_space", "5. Search-space checks",
      f"Is the best trial near a boundary (outer "
      f"{thresholds.boundary_margin:.0%} of a range on its scale)? What fraction "
      f"of trials is infeasible, and where do they lie? Where did retrospective "
      f"checkpoint selection find the best step: always in the first "
      f"{thresholds.early_best_step_fraction:.0%} of training means "
      f"max_train_steps is too high; consistently in the last "
      f"{1 - thresholds.late_best_step_fraction:.0%} means train longer.",
      images=[i for i in images if i])


def sampling_section(study, writer, result) -> Section:
  if result is None:
    return Section("sampling", "6. Have we sampled enough?", "",
                   notes=["No feasible trial: nothing to resample."])
  sign = 1 if study.objective.mode == "min" else -1
  rows = []
  for b in result.budgets:
    q1, q2, q3 = (sign * q for q in result.quartiles(b))
    rows.append([str(b), _fmt(q1), _fmt(q2), _fmt(q3)])
  image = writer.image(plots.bootstrap_plot(study, result), "bootstrap",
                       "Best result of simulated studies (bootstrap) per budget")
  return Section(
      "sampling", "6. Have we sampled enough?",
      "Resampling the finished trials with replacement simulates studies with "
      "fewer trials (the playbook's Figure 3). Wide boxes at the full budget mean "
      "a repeat of this study could end quite differently: run more trials or "
      "shrink the search space.",
      images=[image],
      tables=[(["trials", "25th percentile", "median", "75th percentile"], rows)])


def leaderboard_section(study, report_dir, thresholds) -> Section:
  dims = list(study.dimensions) or sorted({k for t in study.trials for k in t.values})
  order = {"feasible": 0, "infeasible": 1, "unfinished": 2}
  feasible_rank = {t.trial_id: i for i, t in enumerate(study.feasible_trials())}
  def key(t):
    group = "feasible" if t.feasible else ("infeasible" if t.infeasible else "unfinished")
    return (order[group], feasible_rank.get(t.trial_id, 0), t.trial_id)
  rows = []
  for t in sorted(study.trials, key=key):
    rank = feasible_rank.get(t.trial_id)
    fraction = (f" ({t.best_step / t.total_train_steps:.0%})"
                if t.best_step is not None and t.total_train_steps else "")
    links = [Link(f, os.path.relpath(os.path.join(t.run_dir, f), report_dir))
             for f in t.present_files]
    status = t.status + (f": {t.reason[:80]}" if t.reason else "")
    wait = throughput_checks.input_wait(t, thresholds)
    rows.append([str(rank + 1) if rank is not None else "", t.trial_id, status,
                 _fmt(t.best_value), _fmt(t.best_step) + fraction,
                 _fmt(t.final_step), wait.text() if wait else ""]
                + [_fmt(t.values.get(d)) for d in dims]
                + [links or "no records", Code(t.command)])
  header = (["rank", "trial", "status", f"best {study.objective.metric}", "best step",
             "final step", "input wait"] + dims + ["records", "reproduce"])
  return Section(
      "leaderboard", "7. Leaderboard",
      "Every trial, best first (infeasible and unfinished trials last), with its "
      "hyperparameters, records and the command that reruns it (relaunching "
      "resumes from its last checkpoint). Input wait: the mean (and worst) "
      "share of a log interval the loop waited for its next batch with "
      "nothing left for the devices to run.",
      tables=[(header, rows)])
