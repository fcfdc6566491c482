"""Synthetic studies for the analysis tests, each built to show one pattern.

A study directory is written exactly as the sweep and the trainer write one
(study.json plus trials/<id>/{config,summary}.json, metrics.jsonl and
grad_norms.jsonl), with curves drawn from closed-form shapes:

  healthy    near its best by ~50% of training, best step ~65%, flat after
  overfit    validation error rises steadily after 40% of training
  noisy      healthy, with large step-to-step noise on every evaluation
  early      best within the first 10% of training, slowly rising after
  late       still falling steeply at the last step
  saturated  at its best by ~12% of training, flat after
  diverged / failed / unfinished / no_start   infeasible or incomplete trials

`clean_study` is the control: no finding above "info" fires on it. Every
other builder changes one thing in it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Sequence

import numpy as np

MAX_STEPS = 1000
EVAL_EVERY = 25
START_ERROR = 0.9

SEARCH_SPACE = {
    "optimizer.learning_rate": {"scale": "log", "min": 1e-3, "max": 1.0},
    "optimizer.momentum": {"scale": "reverse_log", "min": 0.8, "max": 0.999},
    "model.activation": {"scale": "categorical", "values": ["relu", "gelu"],
                         "role": "scientific"},
}


@dataclasses.dataclass
class TrialSpec:
  """One synthetic trial: where it lies, how good it is, how its curves look."""
  lr_position: float  # Position in the learning rate range (log scale), 0..1.
  momentum_position: float
  activation: str
  best: float  # Lowest validation error rate reached.
  shape: str = "healthy"
  grads: str = "smooth"  # smooth | spiky | decaying
  grad_clip_norm: float = 0.0
  noise: float = 0.002
  input_wait: float = 0.02  # Mean share of each log interval spent waiting for input.
  loss: str = "falling"  # Per-step training loss: see training_loss.


def dimension_value(name: str, position: float) -> float:
  spec = SEARCH_SPACE[name]
  lo, hi = spec["min"], spec["max"]
  if spec["scale"] == "log":
    return float(math.exp(math.log(lo) + position * (math.log(hi) - math.log(lo))))
  a, b = -math.log(1 - lo), -math.log(1 - hi)
  return float(1 - math.exp(-(a + position * (b - a))))


def validation_curve(spec: TrialSpec, steps: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
  """Validation error rate at each eval step for the spec's shape."""
  t = steps / MAX_STEPS
  a = START_ERROR - spec.best
  if spec.shape == "overfit":
    y = spec.best + a * np.exp(-t / 0.08) + 0.15 * np.maximum(0, t - 0.4)
  elif spec.shape == "early":
    y = spec.best + a * np.exp(-t / 0.008) + 0.03 * t
  elif spec.shape == "late":
    y = spec.best + 0.6 * a * np.exp(-t / 0.1) + 0.4 * a * (1 - t)
  elif spec.shape == "saturated":
    y = spec.best + a * np.exp(-t / 0.03)
  else:
    y = spec.best + a * np.exp(-t / 0.12) + 0.03 * np.maximum(0, t - 0.6)
  noise = {"noisy": 0.03, "early": 0.0005}.get(spec.shape, spec.noise)
  y = y + rng.normal(0, noise, len(t))
  return np.clip(y, 0.0, 1.0)


def training_loss(spec: TrialSpec, steps: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
  """Per-step training loss.

  falling      2.3 -> 0.05 with small uniform noise (every shape's default)
  rising       falls to ~0.4, then climbs by 0.6 from 40% of training on
  noisy_flat   flat at 1.0 with large (lognormal, spiky) minibatch noise
  warmup_bump  falling, with a bump of +1.0 over the first 5% of training
  mid_spike    falling, with the loss 30x higher for 8 steps from step 500
  stuck_high   falls from 2.3 only to about 1.5: finished, but far above
               the other trials (infeasible-like)
  """
  t = steps / MAX_STEPS
  if spec.loss == "noisy_flat":
    return 1.0 * np.exp(rng.normal(0, 0.4, len(t)))
  loss = 2.3 * np.exp(-steps / 150) + 0.05 + 0.02 * rng.random(len(steps))
  if spec.loss == "rising":
    loss = (2.3 * np.exp(-steps / 150) + 0.4 + 1.5 * np.maximum(0, t - 0.4) ** 1.5
            + 0.05 * rng.standard_normal(len(t)))
  elif spec.loss == "warmup_bump":
    loss = loss + 1.0 * np.sin(np.pi * np.clip(t / 0.05, 0, 1))
  elif spec.loss == "stuck_high":
    loss = loss + 1.45
  elif spec.loss == "mid_spike":
    loss[(steps >= 500) & (steps < 508)] *= 30.0
  return loss


def grad_norm_series(spec: TrialSpec, steps: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
  t = steps / MAX_STEPS
  norms = (1.0 + 1.0 * np.exp(-t / 0.2)) * np.exp(rng.normal(0, 0.1, len(t)))
  if spec.grads == "decaying":  # Falls 1000x as the training loss goes to 0.
    norms = 2.0 * np.exp(-t / 0.145) * np.exp(rng.normal(0, 0.1, len(t)))
  if spec.grads == "spiky":
    norms[rng.choice(len(t), 5, replace=False)] *= 40.0
  return norms


def _jsonl(path: str, rows: Sequence[dict[str, Any]]) -> None:
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def write_trial(run_dir: str, spec: TrialSpec, seed: int) -> dict[str, Any]:
  """Writes one trial's records; returns its params."""
  rng = np.random.default_rng(seed)
  params = {"optimizer.learning_rate": dimension_value(
                "optimizer.learning_rate", spec.lr_position),
            "optimizer.momentum": dimension_value(
                "optimizer.momentum", spec.momentum_position),
            "model.activation": spec.activation}
  os.makedirs(run_dir, exist_ok=True)
  if spec.shape == "no_start":
    with open(os.path.join(run_dir, "log.txt"), "w") as f:
      f.write("Error: could not start\n")
    return params
  config = {"workload": "synthetic", "seed": seed, "max_train_steps": MAX_STEPS,
            "eval_every_steps": EVAL_EVERY, "grad_clip_norm": spec.grad_clip_norm,
            "best_metric": "eval/validation/error_rate", "best_mode": "min",
            "optimizer": {"learning_rate": params["optimizer.learning_rate"],
                          "momentum": params["optimizer.momentum"]},
            "model": {"activation": spec.activation}}
  with open(os.path.join(run_dir, "config.json"), "w") as f:
    json.dump(config, f)
  last = {"diverged": 300, "failed": 0, "unfinished": 500}.get(spec.shape, MAX_STEPS)
  eval_steps = np.arange(EVAL_EVERY, last + 1, EVAL_EVERY)
  val = validation_curve(spec, eval_steps, rng)
  train_err = np.clip(val - 0.03, 0, 1)
  steps = np.arange(1, last + 1)
  norms = grad_norm_series(spec, steps, rng)
  loss = training_loss(spec, steps, rng)
  if spec.shape == "diverged":
    loss[-20:], norms[-20:] = np.nan, np.inf
  _jsonl(os.path.join(run_dir, "grad_norms.jsonl"),
         [{"step": int(s), "train/grad_norm": float(n), "train/loss": float(l)}
          for s, n, l in zip(steps, norms, loss)])
  rows = []
  for s in eval_steps:
    i = int(s) - 1
    row = {"step": int(s), "train/loss": float(loss[i]),
           "train/grad_norm": float(norms[max(0, i - EVAL_EVERY + 1):i + 1].mean()),
           "train/learning_rate": params["optimizer.learning_rate"],
           "perf/input_wait_fraction": float(np.clip(
               spec.input_wait * (1 + 0.2 * rng.standard_normal()), 0, 1))}
    k = int(s) // EVAL_EVERY - 1
    if spec.shape == "diverged" and s > last - EVAL_EVERY:
      row["eval/validation/error_rate"] = float("nan")
    else:
      row.update({"eval/validation/error_rate": float(val[k]),
                  "eval/validation/loss": float(2.3 * val[k]),
                  "eval/train/error_rate": float(train_err[k]),
                  "eval/train/loss": float(2.3 * train_err[k])})
    rows.append(row)
  _jsonl(os.path.join(run_dir, "metrics.jsonl"), rows)
  if spec.shape == "unfinished":
    return params
  if spec.shape == "failed":
    summary = {"status": "failed", "best_step": None, "best_value": None,
               "final_step": None, "reason": "RuntimeError: out of memory"}
  else:
    finite = np.where(np.isfinite(val), val, np.inf)
    if spec.shape == "diverged":
      finite[-1] = np.inf
    b = int(np.argmin(finite))
    summary = {"status": "diverged" if spec.shape == "diverged" else "completed",
               "best_step": int(eval_steps[b]), "best_value": float(finite[b]),
               "final_step": int(last),
               "reason": "loss is NaN at step 281" if spec.shape == "diverged" else None}
  summary.update({"best_metric": "eval/validation/error_rate", "best_mode": "min",
                  "max_train_steps": MAX_STEPS, "best_checkpoint": None})
  with open(os.path.join(run_dir, "summary.json"), "w") as f:
    json.dump(summary, f)
  return params


def write_study(study_dir: str, specs: Sequence[TrialSpec], name: str = "synthetic",
                search_space: dict[str, Any] | None = None) -> str:
  """Writes study.json and every trial; returns the study directory."""
  trials = []
  for i, spec in enumerate(specs):
    trial_id = f"{i:04d}"
    params = write_trial(os.path.join(study_dir, "trials", trial_id), spec, seed=i)
    trials.append({"trial_id": trial_id, "params": params})
  with open(os.path.join(study_dir, "study.json"), "w") as f:
    json.dump({"name": name, "description": f"Synthetic study: {name}.", "seed": 0,
               "config": "configs/synthetic.py",
               "search_space": search_space or SEARCH_SPACE, "trials": trials}, f)
  return study_dir


def clean_specs() -> list[TrialSpec]:
  """The control: best trials mid-range, healthy curves, one infeasible trial."""
  return [
      TrialSpec(0.50, 0.50, "relu", 0.090),
      TrialSpec(0.45, 0.60, "gelu", 0.095),
      TrialSpec(0.55, 0.40, "relu", 0.098),
      TrialSpec(0.40, 0.45, "gelu", 0.100),
      TrialSpec(0.30, 0.70, "relu", 0.160),
      TrialSpec(0.65, 0.25, "gelu", 0.200),
      TrialSpec(0.20, 0.35, "relu", 0.250),
      TrialSpec(0.75, 0.80, "gelu", 0.300),
      TrialSpec(0.15, 0.20, "relu", 0.400),
      TrialSpec(0.90, 0.55, "gelu", 0.0, shape="diverged"),
  ]


def clean_study(study_dir: str) -> str:
  return write_study(study_dir, clean_specs(), "clean")


def modified_study(study_dir: str, name: str, indices: Sequence[int],
                   **changes: Any) -> str:
  """The control with `changes` applied to the trials at `indices`."""
  specs = clean_specs()
  for i in indices:
    specs[i] = dataclasses.replace(specs[i], **changes)
  return write_study(study_dir, specs, name)
