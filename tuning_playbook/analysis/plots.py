"""Study-level figures: axis plots, isolation plots, coverage, best steps, bootstrap.

Figures are built with matplotlib's object API (no pyplot state) and saved by
the caller with `save(fig, path)`, which renders through Agg.

  fig = plots.axis_plot(study, study.dimensions["optimizer.learning_rate"])
  plots.save(fig, "report/axis_optimizer.learning_rate.png")
"""

from __future__ import annotations

from typing import Any, Sequence

from matplotlib.backends import backend_agg
from matplotlib.figure import Figure
import numpy as np

from tuning_playbook.analysis import bootstrap
from tuning_playbook.analysis import findings as findings_lib
from tuning_playbook.analysis import isolation
from tuning_playbook.analysis import study_data
from tuning_playbook.common import atomic_files

FEASIBLE = "#1f77b4"
INFEASIBLE = "#d62728"
BEST = "#ff9f1c"
UNFINISHED_COLOR = "#999999"
DPI = 90


def save(fig: Figure, path: str) -> None:
  """Writes `fig` as a PNG through the Agg backend."""
  backend_agg.FigureCanvasAgg(fig)
  with atomic_files.replacing(path, "wb") as f:
    fig.savefig(f, format="png", dpi=DPI)


def _figure(width: float = 6.4, height: float = 4.2) -> tuple[Figure, Any]:
  fig = Figure(figsize=(width, height), layout="constrained")
  return fig, fig.add_subplot()


def _categories(study: study_data.Study, dim: study_data.Dimension) -> list[str]:
  names = [str(v) for v in dim.values or ()]
  for trial in study.trials:
    value = str(trial.values.get(dim.name))
    if dim.name in trial.values and value not in names:
      names.append(value)
  return names


class _XAxis:
  """Maps a hyperparameter's values onto the x axis of its scale."""

  def __init__(self, study: study_data.Study, dim: study_data.Dimension):
    self.dim = dim
    self.categories = None if dim.numeric else _categories(study, dim)

  def __call__(self, value: Any) -> float:
    if self.categories is not None:
      return float(self.categories.index(str(value)))
    if not isinstance(value, (int, float)):
      return float("nan")
    return 1 - float(value) if self.dim.scale == "reverse_log" else float(value)

  def style(self, ax) -> None:
    dim = self.dim
    if self.categories is not None:
      ax.set_xticks(range(len(self.categories)), self.categories)
      ax.set_xlim(-0.5, len(self.categories) - 0.5)
      ax.set_xlabel(f"{dim.name} (categorical)")
      return
    if dim.scale in ("log", "int_log", "reverse_log"):
      ax.set_xscale("log")
    if dim.scale == "reverse_log":
      ax.invert_xaxis()  # Larger values of the hyperparameter to the right.
      ax.set_xlabel(f"1 - {dim.name} (reverse log scale)")
    else:
      ax.set_xlabel(f"{dim.name} ({dim.scale} scale)")
    for bound in (dim.min, dim.max):
      if isinstance(bound, (int, float)):
        ax.axvline(self(bound), color="#555555", linestyle="--", linewidth=0.8)


def _infeasible_y(study: study_data.Study, feasible_y: Sequence[float]) -> float:
  """Where infeasible trials without a value are drawn: past the worst feasible."""
  if not len(feasible_y):
    return 0.0
  lo, hi = float(np.min(feasible_y)), float(np.max(feasible_y))
  pad = 0.12 * (hi - lo) if hi > lo else 0.1 * max(abs(hi), 1e-3)
  return hi + pad if study.objective.mode == "min" else lo - pad


def _objective_label(study: study_data.Study) -> str:
  better = "lower" if study.objective.mode == "min" else "higher"
  return f"best {study.objective.metric}\nover training ({better} is better)"


def axis_plot(study: study_data.Study, dim: study_data.Dimension) -> Figure:
  """Basic hyperparameter axis plot: each trial's best objective vs the value."""
  fig, ax = _figure()
  x_of = _XAxis(study, dim)
  jitter = np.random.default_rng(0)
  def xs(trials):
    x = np.array([x_of(t.values.get(dim.name)) for t in trials])
    if x_of.categories is not None:
      x = x + jitter.uniform(-0.15, 0.15, len(x))
    return x
  feasible = study.feasible_trials()
  fy = [t.best_value for t in feasible]
  ax.scatter(xs(feasible), fy, color=FEASIBLE, s=28, label="feasible trial", zorder=3)
  if feasible:
    best = feasible[0]
    ax.scatter(xs([best]), [best.best_value], marker="*", s=220, color=BEST,
               edgecolor="black", zorder=4, label=f"best ({best.trial_id})")
  infeasible = [t for t in study.trials if t.infeasible]
  if infeasible:
    # Drawn past the worst feasible trial, whatever they reached before failing.
    iy = [_infeasible_y(study, fy)] * len(infeasible)
    ax.scatter(xs(infeasible), iy, marker="x", s=70, linewidths=2, color=INFEASIBLE,
               label="infeasible trial", zorder=3)
  x_of.style(ax)
  ax.set_ylabel(_objective_label(study))
  ax.set_title(f"Axis plot: {dim.name} [{dim.role}]", fontsize=11)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="best", framealpha=0.6)
  return fig


def isolation_plot(study: study_data.Study, dim: study_data.Dimension) -> Figure:
  """Best trial per value (or bucket) of `dim`, the others optimized away."""
  fig, ax = _figure()
  x_of = _XAxis(study, dim)
  feasible = study.feasible_trials()
  ax.scatter([x_of(t.values.get(dim.name)) for t in feasible],
             [t.best_value for t in feasible], color="#c7c7c7", s=18,
             label="all feasible trials", zorder=2)
  points = []
  groups = isolation.groups(study, dim)
  for group in groups:
    best = isolation.best_trials(study, group, 1)
    if best:
      points.append((x_of(best[0].values.get(dim.name)), best[0]))
  points.sort(key=lambda p: p[0])
  if points:
    ax.plot([p[0] for p in points], [p[1].best_value for p in points], "-o",
            color=FEASIBLE, markersize=7, label="best trial per value", zorder=3)
    for x, trial in points:
      ax.annotate(trial.trial_id, (x, trial.best_value), textcoords="offset points",
                  xytext=(4, 6), fontsize=8)
  bucketed = groups and groups[0].label.startswith("[")
  if bucketed and x_of.categories is None:
    positions = np.linspace(0, 1, len(groups) + 1)[1:-1]
    bounded = isolation.with_observed_bounds(dim, [t.values.get(dim.name)
                                                   for t in study.trials])
    for p in positions:
      ax.axvline(x_of(bounded.value_at(float(p))), color="#bbbbbb", linewidth=0.8,
                 linestyle=":")
  x_of.style(ax)
  ax.set_ylabel(_objective_label(study))
  how = "buckets (dotted)" if bucketed else "values"
  ax.set_title(f"Isolation plot: {dim.name}, best trial over {how}", fontsize=11)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="best", framealpha=0.6)
  return fig


def coverage_plot(study: study_data.Study,
                  thresholds: findings_lib.Thresholds) -> Figure | None:
  """Every numeric dimension scaled to [0, 1]: where trials, failures and the best lie."""
  dims = [isolation.with_observed_bounds(d, [t.values.get(d.name) for t in study.trials])
          for d in study.varied_dimensions() if d.numeric]
  if not dims:
    return None
  fig, ax = _figure(9.0, 1.2 + 0.55 * len(dims))
  best = study.best_trial()
  margin = thresholds.boundary_margin
  ax.axvspan(-0.02, margin, color="#fde0c5", zorder=0)
  ax.axvspan(1 - margin, 1.02, color="#fde0c5", zorder=0, label="near a boundary")
  labelled = set()
  for row, dim in enumerate(dims):
    for trial in study.trials:
      p = dim.position(trial.values.get(dim.name))
      if p is None:
        continue
      if trial.feasible:
        kind, style = "feasible", dict(color=FEASIBLE, marker="o", s=22)
      elif trial.infeasible:
        kind, style = "infeasible", dict(color=INFEASIBLE, marker="x", s=60)
      else:
        kind, style = "unfinished", dict(facecolors="none", marker="o", s=30,
                                         edgecolors=UNFINISHED_COLOR)
      style["label"] = None if kind in labelled else kind
      labelled.add(kind)
      ax.scatter([p], [row], zorder=3, **style)
    if best is not None and dim.position(best.values.get(dim.name)) is not None:
      ax.scatter([dim.position(best.values.get(dim.name))], [row], marker="*", s=200,
                 color=BEST, edgecolor="black", zorder=4,
                 label=None if "best" in labelled else "best trial")
      labelled.add("best")
    ax.text(-0.03, row, f"{dim.min:.3g}", ha="right", va="center", fontsize=7)
    ax.text(1.03, row, f"{dim.max:.3g}", ha="left", va="center", fontsize=7)
  ax.set_yticks(range(len(dims)), [d.name for d in dims])
  ax.set_xlim(-0.12, 1.12)
  ax.set_ylim(-0.7, len(dims) - 0.3)
  ax.set_xlabel("position in the search range (each dimension on its own scale)")
  ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.04, 0.5), frameon=False)
  ax.set_title("Search space coverage", fontsize=11)
  return fig


def best_step_plot(study: study_data.Study,
                   thresholds: findings_lib.Thresholds) -> Figure | None:
  """Retrospective best step / total_train_steps of each feasible trial."""
  trials = [t for t in study.feasible_trials()
            if t.best_step is not None and t.total_train_steps]
  if not trials:
    return None
  fig, ax = _figure()
  early, late = thresholds.early_best_step_fraction, thresholds.late_best_step_fraction
  ax.axvspan(0, early, color="#fde0c5", label=f"first {early:.0%}: too many steps?")
  ax.axvspan(late, 1.0, color="#d5e8d4", label=f"last {1 - late:.0%}: train longer?")
  x = [t.best_step / t.total_train_steps for t in trials]
  ax.scatter(x, [t.best_value for t in trials], color=FEASIBLE, s=28, zorder=3,
             label="feasible trial")
  ax.scatter(x[:1], [trials[0].best_value], marker="*", s=220, color=BEST,
             edgecolor="black", zorder=4, label=f"best ({trials[0].trial_id})")
  ax.set_xlim(-0.02, 1.04)
  ax.set_xlabel("retrospective best step / total_train_steps")
  ax.set_ylabel(_objective_label(study))
  ax.set_title("Where retrospective checkpoint selection found the best step",
               fontsize=11)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="best", framealpha=0.6)
  return fig


def bootstrap_plot(study: study_data.Study,
                   result: bootstrap.BootstrapResult) -> Figure:
  """Box plots of the best result of simulated studies per trial budget."""
  fig, ax = _figure(7.0, 4.2)
  sign = 1 if study.objective.mode == "min" else -1
  data = []
  for b in result.budgets:
    x = result.best[b]
    data.append(sign * x[np.isfinite(x)])
  positions = np.arange(1, len(result.budgets) + 1)
  ax.boxplot(data, positions=positions, widths=0.6, showfliers=True)
  ax.set_xticks(positions, [str(b) for b in result.budgets])
  ax.set_xlabel("number of trials in a simulated study (bootstrap)")
  ax.set_ylabel(_objective_label(study))
  ax.set_title("Best result vs trial budget", fontsize=11)
  ax.grid(alpha=0.3, axis="y")
  return fig
