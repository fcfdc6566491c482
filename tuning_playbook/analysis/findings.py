"""A finding: one thing the analysis noticed about a study, in plain words.

Every check module returns `Finding`s; findings.json holds them as

  {"id": "near_boundary/optimizer.learning_rate/max", "kind": "near_boundary",
   "severity": "warning", "message": "...what to do...", "details": {...}}

and, when the finding suggests a next step, `"command": "python -m ..."`.

The thresholds every check uses live in one `Thresholds` value, passed
explicitly, so a test or a user can change one without touching the checks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

INFO = "info"
WARNING = "warning"


@dataclasses.dataclass(frozen=True)
class Finding:
  id: str
  kind: str
  severity: str
  message: str
  details: dict[str, Any]
  # The command to paste for the next step the finding suggests, if any.
  command: str | None = None

  def to_json(self) -> dict[str, Any]:
    out = {"id": self.id, "kind": self.kind, "severity": self.severity,
           "message": self.message, "details": jsonable(self.details)}
    if self.command is not None:
      out["command"] = self.command
    return out


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """The numbers behind every finding (fractions are of the named whole)."""
  # Best few trials whose curves and gradients are examined (per scientific value).
  top_k: int = 3
  # "Near a boundary": within this fraction of the range, on the dimension's scale.
  boundary_margin: float = 0.1
  # Infeasible fraction of finished trials that is a warning, not just a note.
  infeasible_warning_fraction: float = 0.5
  # The playbook's Figure 7a: every infeasible trial lies above a learning
  # rate, and the best trial within this fraction of the range (on its
  # scale) below that edge of stability.
  instability_edge_margin: float = 0.15
  # Retrospective best step as a fraction of total_train_steps (the steps
  # trained, a prepended warmup included): every trial at or
  # below `early` means max_train_steps is too high; at least `late_share` of
  # trials (the best included) above `late` means train longer.
  early_best_step_fraction: float = 0.1
  late_best_step_fraction: float = 0.75
  late_best_step_share: float = 0.75
  # Curves (objective made lower-is-better; "improvement" = from the worst
  # value before the best to the best). Step-to-step noise is the standard
  # deviation of first differences over the last quarter / sqrt(2).
  overfit_rise: float = 0.03  # Rise after the best, as a fraction of the improvement.
  noise_multiple: float = 3.0  # ...and larger than this many noise deviations.
  late_noise: float = 0.1  # Late noise relative to the late level of the curve.
  still_improving: float = 0.05  # Improvement within the last 25% of training.
  saturation_tolerance: float = 0.02  # "At its best" within this of the improvement.
  saturation_fraction: float = 0.4  # ...reached by this fraction of training.
  # Gradient clipping.
  clip_percentile: float = 90.0
  aggressive_clip_fraction: float = 0.5
  gradient_outlier_factor: float = 10.0  # A spike: this many times the median norm.
  # Sampling: the "good region" is within this fraction of the gap between the
  # best and the median feasible trial; warn when a repeat study of the same
  # budget would miss it with more than `miss_probability`.
  good_region: float = 0.2
  miss_probability: float = 0.05
  bootstrap_samples: int = 2000
  # Input-bound: mean share of the log intervals spent waiting for the next
  # batch above this (a trial's own input_bound_warning_fraction wins).
  input_wait_fraction: float = 0.2
  # Training loss increasing (usually a bug): the per-step loss, after the
  # warmup and the first `loss_rise_skip` of the steps, is cut into
  # `loss_rise_windows` windows; a window's median above the lowest median
  # before it by more than each of `loss_rise_level` x that lowest median,
  # `loss_rise_improvement` x the drop from the first window to it, and
  # `loss_rise_noise_multiple` noise deviations of a window median is
  # raised; raised windows in a row covering at least `loss_rise_span` of
  # the examined steps are a sustained rise.
  loss_rise_skip: float = 0.1
  loss_rise_windows: int = 20
  loss_rise_level: float = 0.1
  loss_rise_improvement: float = 0.05
  loss_rise_noise_multiple: float = 4.0
  loss_rise_span: float = 0.15
  # Loss spikes (instability checks): a step whose loss exceeds
  # `spike_factor` x the lowest trailing-window median so far, or the median
  # of the `spike_window` steps before it by `spike_jump` x that median and
  # `noise_multiple` noise deviations.
  spike_window: int = 10
  spike_factor: float = 2.0
  spike_jump: float = 1.0
  # In an ordinary study's report a spike must also reach this many times
  # its reference, and exp(`report_spike_noise_multiple` x the trial's
  # step-to-step noise of log loss): heavy-tailed minibatch noise alone
  # reaches 5x (a lognormal loss of sigma 0.4 over 9000 steps: 5.4x).
  report_spike_size: float = 3.0
  report_spike_noise_multiple: float = 6.0
  # Next-step commands: a repeat study should miss the good region with at
  # most `miss_probability`; a too-long training is cut to this many times
  # the latest best step; round 2 trains this many times longer.
  # Infeasible-like (the playbook's Figure 7a: "uncharacteristically high
  # values of the loss"): a finished trial whose final training loss is at
  # least `high_loss_factor` x the study's median and `high_loss_deviations`
  # robust deviations (of log loss) above it, among at least
  # `high_loss_min_trials` feasible trials.
  high_loss_factor: float = 3.0
  high_loss_deviations: float = 5.0
  high_loss_min_trials: int = 5
  early_stop_margin: float = 2.0
  round2_steps_factor: float = 2.0


def jsonable(value: Any) -> Any:
  """Plain JSON values: numpy scalars to Python, NaN/Inf to None."""
  if isinstance(value, dict):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return [jsonable(v) for v in value.tolist()]
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (np.floating, float)):
    value = float(value)
    return value if math.isfinite(value) else None
  if isinstance(value, np.bool_):
    return bool(value)
  return value


def fmt(value: Any) -> str:
  """A number in a message: 3 significant digits."""
  if isinstance(value, (float, np.floating)):
    return f"{float(value):.3g}"
  return str(value)


def percent(fraction: float) -> str:
  return f"{100 * fraction:.0f}%"


def trial_list(ids, limit: int = 6) -> str:
  ids = list(ids)
  shown = ", ".join(ids[:limit])
  return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")
