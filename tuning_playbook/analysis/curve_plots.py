"""Per-trial figures: training curves and gradient norms.

  fig = curve_plots.training_curves(study, "best trials", trials)
  fig = curve_plots.gradient_norms(trial, gradient_checks.stats(trial, thresholds))
"""

from __future__ import annotations

from typing import Sequence

from matplotlib.figure import Figure
import numpy as np

from tuning_playbook.analysis import gradient_checks
from tuning_playbook.analysis import plots
from tuning_playbook.analysis import study_data

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
          "#17becf", "#bcbd22")


def _finite(steps: np.ndarray, values: np.ndarray):
  keep = np.isfinite(values)
  return steps[keep], values[keep]


def _positive_log(ax, values: Sequence[np.ndarray]) -> None:
  """Log y axis when every value is positive and they span a wide range."""
  flat = np.concatenate([v for v in values if len(v)]) if values else np.array([])
  if len(flat) and np.all(flat > 0) and flat.max() / flat.min() > 30:
    ax.set_yscale("log")


def all_curves(study: study_data.Study, highlight: Sequence[str]) -> Figure | None:
  """The validation objective of every trial over training, best few highlighted."""
  metric = study.objective.metric
  fig = Figure(figsize=(8.0, 4.2), layout="constrained")
  ax = fig.add_subplot()
  drawn, finite_values = 0, []
  for trial in study.trials:
    steps, values = _finite(*trial.series(metric))
    if not len(steps) or trial.trial_id in highlight:
      continue
    color = plots.INFEASIBLE if trial.infeasible else "#9ecae1"
    ax.plot(steps, values, color=color, linewidth=0.9, alpha=0.8)
    drawn += 1
    if trial.feasible:
      finite_values.append(values)
  for i, trial_id in enumerate(highlight):
    trial = next(t for t in study.trials if t.trial_id == trial_id)
    steps, values = _finite(*trial.series(metric))
    if not len(steps):
      continue
    ax.plot(steps, values, color=COLORS[i % len(COLORS)], linewidth=2,
            label=f"{trial_id} (best #{i + 1})")
    finite_values.append(values)
    drawn += 1
  if not drawn:
    return None
  ax.plot([], [], color="#9ecae1", label="other feasible trials")
  ax.plot([], [], color=plots.INFEASIBLE, label="infeasible trials")
  if finite_values:
    flat = np.concatenate(finite_values)
    lo, hi = np.percentile(flat, [0, 98])
    pad = 0.05 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1e-3)
    ax.set_ylim(lo - pad, hi + pad)
  ax.set_xlabel("step")
  ax.set_ylabel(metric)
  ax.set_title(f"{metric} of every trial over training", fontsize=11)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="best")
  return fig


def training_curves(study: study_data.Study, title: str,
                    trials: Sequence[study_data.Trial]) -> Figure:
  """Training and validation metric (left) and loss (right) vs step."""
  objective = study.objective
  train_metric = objective.on_split("train")
  fig = Figure(figsize=(11.0, 4.0), layout="constrained")
  left, right = fig.subplots(1, 2)
  losses = []
  for i, trial in enumerate(trials):
    color = COLORS[i % len(COLORS)]
    steps, values = _finite(*trial.series(objective.metric))
    left.plot(steps, values, "-o", color=color, markersize=3,
              label=f"{trial.trial_id} validation")
    steps, values = _finite(*trial.series(train_metric))
    if len(steps):
      left.plot(steps, values, "--", color=color, label=f"{trial.trial_id} train")
    if trial.best_step is not None and trial.best_value is not None:
      left.scatter([trial.best_step], [trial.best_value], marker="*", s=120,
                   color=color, edgecolor="black", zorder=4)
    steps, values = _finite(*trial.series("train/loss"))
    if len(steps):
      right.plot(steps, values, color=color, linewidth=0.8, alpha=0.7,
                 label=f"{trial.trial_id} train/loss")
      losses.append(values)
    steps, values = _finite(*trial.series("eval/validation/loss"))
    if len(steps):
      right.plot(steps, values, "-o", color=color, markersize=3,
                 label=f"{trial.trial_id} eval/validation/loss")
      losses.append(values)
  left.set_title(f"{objective.metric.split('/')[-1]}: validation (solid), "
                 f"train subset (dashed); * best step", fontsize=9)
  right.set_title("loss: training batches (thin), validation (dots)", fontsize=9)
  _positive_log(right, losses)
  for ax in (left, right):
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
  fig.suptitle(title, fontsize=11)
  return fig


def gradient_norms(trial: study_data.Trial,
                   stats: gradient_checks.GradientStats) -> Figure:
  """Unclipped gradient norm vs step, and its histogram over all steps."""
  steps, norms = _finite(*trial.grad_norms)
  fig = Figure(figsize=(11.0, 3.6), layout="constrained")
  left, right = fig.subplots(1, 2)
  left.plot(steps, norms, color=plots.FEASIBLE, linewidth=0.7)
  positive = norms[norms > 0]
  if len(positive):
    left.set_yscale("log")
    bins = np.geomspace(positive.min(), positive.max() * 1.0001, 40)
    right.hist(positive, bins=bins, color=plots.FEASIBLE, alpha=0.8)
    right.set_xscale("log")
  lines = [(stats.suggested_threshold, plots.BEST,
            f"90th percentile {stats.suggested_threshold:.3g} (suggested threshold)")]
  if stats.configured_threshold > 0:
    lines.append((stats.configured_threshold, plots.INFEASIBLE,
                  f"grad_clip_norm {stats.configured_threshold:.3g}"))
  for value, color, label in lines:
    left.axhline(value, color=color, linestyle="--", label=label)
    right.axvline(value, color=color, linestyle="--", label=label)
  left.set_xlabel("step")
  left.set_ylabel("unclipped gradient norm")
  right.set_xlabel("unclipped gradient norm")
  right.set_ylabel("steps")
  for ax in (left, right):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
  fig.suptitle(f"Trial {trial.trial_id}: gradient norms", fontsize=11)
  return fig
