"""One trial's records, the same whether it trains alone or in a population.

  recorder = TrialRecords(config, workdir, stream=stream, is_writer=True,
                          device_kind=..., device_count=...)
  state = recorder.restore(recorder.latest_step(), target)  # When resuming.
  recorder.open_logs()
  reason = recorder.log(first, step, fetched, seconds=..., input_wait=...,
                        evaluate=lambda: (eval_metrics, state_to_save))
  summary = recorder.finish(reason, compute_dtype="float32")

writes `config.json`, `metrics.jsonl` (one row per log step: the window's
train metrics, `perf/*` and, at evals, the eval metrics), `grad_norms.jsonl`
(every step), TensorBoard scalars, the best-N checkpoints (Orbax; each eval
saves one, with the data position in its metadata) and `summary.json`.
Both the single-run trainer (train.py) and the population trainer
(population.py) write through this class, so a trial trained in a group
leaves the same files, in the same form, as one trained alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from tuning_playbook.common import records
from tuning_playbook.common import step_logs
from tuning_playbook import config_paths
from tuning_playbook import config_schema
from tuning_playbook.training import checkpointing
from tuning_playbook.training import tensorboard_writer
from tuning_playbook.training import throughput

# Evaluates the state at an eval step: (eval metrics, the state to checkpoint).
EvaluateFn = Callable[[], tuple[dict[str, float], Any]]


class ResumeError(ValueError):
  """The run in the work directory cannot be resumed as configured now."""


@dataclasses.dataclass
class BestCheckpoint:
  """The best eval so far by the configured metric (retrospective selection)."""
  metric: str
  mode: str
  step: int | None = None
  value: float | None = None

  def update(self, step: int, value: float) -> None:
    new = checkpointing.checkpoint_rank(value, step, self.mode)
    if self.step is None or new > checkpointing.checkpoint_rank(
        self.value, self.step, self.mode):
      self.step, self.value = step, value


def window_row(step: int, window: Sequence[dict[str, Any]]) -> dict[str, float]:
  """The train metrics of a log row: means (and max) over the steps fetched."""
  losses = np.array([m["train/loss"] for m in window], np.float64)
  norms = np.array([m["train/grad_norm"] for m in window], np.float64)
  return {"step": step,
          "train/loss": float(np.mean(losses)),
          "train/grad_norm": float(np.mean(norms)),
          "train/grad_norm_max": float(np.max(norms)),
          "train/clipped_fraction": float(np.mean([m["train/clipped"] for m in window])),
          "train/learning_rate": float(window[-1]["train/learning_rate"])}


def divergence(first_step: int, window: Sequence[dict[str, Any]],
               threshold: float) -> str | None:
  """Why the run diverged in the window, or None: a non-finite or huge loss."""
  for i, m in enumerate(window):
    loss = float(m["train/loss"])
    if not math.isfinite(loss) or loss > threshold:
      return (f"train/loss={loss!r} at step {first_step + i} (steps "
              f"{first_step}..{first_step + len(window) - 1} fetched; "
              f"divergence_loss_threshold={threshold!r})")
  return None


class TrialRecords:
  """The records of one trial in its work directory (see the module docstring).

  Creating it claims the directory for `config` (config.json; a directory
  holding another config raises `records.ConfigMismatchError`) and removes
  a summary left unfinished.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, *,
               stream: Any, is_writer: bool, device_kind: str,
               device_count: int):
    self.config = config
    self.workdir = workdir
    self.stream = stream
    self.is_writer = is_writer
    self.total_steps = config_schema.total_train_steps(config)
    records.check_or_write_config(workdir, config, write=is_writer)
    if is_writer:
      records.remove_unfinished_summary(workdir)
    self.ckpt = checkpointing.Checkpointer(
        os.path.join(workdir, records.CHECKPOINTS_DIR),
        num_best=config.num_best_checkpoints, best_metric=config.best_metric,
        best_mode=config.best_mode)
    self.best = BestCheckpoint(config.best_metric, config.best_mode)
    self.throughput = throughput.ThroughputMonitor(
        config.batch_size, config.input_bound_warning_fraction,
        device_kind=device_kind, device_count=device_count)
    self.step = 0
    self.open_interval: dict[str, Any] | None = None
    self.metrics_log = self.grad_log = self.writer = None

  def latest_step(self) -> int | None:
    return self.ckpt.latest_step()

  def restore(self, step: int, target: Any) -> Any:
    """The state saved at `step` (placed as `target` says); checks the data."""
    state, meta = self.ckpt.restore(step, target)
    self.step = int(meta["step"])
    # Steps trained but not yet recorded when a run stopped between evals.
    self.open_interval = meta.get("open_interval")
    self.best.step, self.best.value = meta["best_step"], meta["best_value"]
    saved = meta["stream_layout"]
    if saved != self.stream.layout:
      raise ResumeError(
          f"checkpoint {step} in {self.ckpt.directory} was written with training "
          f"streams of {saved} examples per epoch (one entry per host stream), "
          f"now {self.stream.layout}: the data or the process count changed, so "
          "the data order cannot be resumed. Relaunch with the process count "
          "the run started with, or use a new --workdir.")
    return state

  def open_logs(self) -> None:
    """Opens the JSONL logs (dropping rows after the resumed step) and the writer."""
    self.metrics_log = step_logs.StepLog(
        os.path.join(self.workdir, records.METRICS_FILE), self.is_writer)
    self.grad_log = step_logs.StepLog(
        os.path.join(self.workdir, records.GRAD_NORMS_FILE), self.is_writer)
    self.metrics_log.truncate_after(self.step)
    self.grad_log.truncate_after(self.step)
    self.writer = tensorboard_writer.create_default_writer(
        self.workdir, just_logging=not self.is_writer)
    if self.step == 0:  # A fresh run: TensorBoard's HParams dashboard.
      self.writer.write_hparams(hparams(self.config))

  def log(self, first: int, step: int, fetched: Sequence[dict[str, float]], *,
          seconds: float, input_wait: float,
          evaluate: EvaluateFn | None = None) -> str | None:
    """Records the steps first..step; at an eval step also evaluates and
    checkpoints. Returns the divergence reason, if any (then no eval runs).

    `fetched` holds each step's STEP_METRICS, `seconds` the interval's wall
    time and `input_wait` its seconds spent waiting for batches.
    """
    config = self.config
    self.step = step
    self.grad_log.append(
        {"step": first + i, "train/grad_norm": m["train/grad_norm"],
         "train/loss": m["train/loss"]} for i, m in enumerate(fetched))
    row = window_row(step, fetched)
    row.update(self.throughput.interval(first, step, seconds, input_wait))
    reason = divergence(first, fetched, config.divergence_loss_threshold)
    if reason is None and evaluate is not None:
      metrics, state = evaluate()
      row.update(metrics)
      value = row[config.best_metric]
      self.best.update(step, value)
      self.ckpt.save(step, state, self._meta(step), {config.best_metric: value})
    self.metrics_log.append([row])
    self.writer.write_scalars(step, {k: v for k, v in row.items() if k != "step"})
    return reason

  def _meta(self, step: int) -> dict[str, Any]:
    """A checkpoint's metadata: its step, the best so far, the data position."""
    return {"step": step, "best_step": self.best.step,
            "best_value": self.best.value,
            "data_position": self.stream.position(step).to_json(),
            "stream_layout": self.stream.layout}

  def save_to_resume(self, step: int, state: Any, first: int,
                     fetched: Sequence[dict[str, float]]) -> None:
    """Checkpoints `step` between evals (on SIGTERM), with the steps
    first..step not yet recorded (`fetched`, their STEP_METRICS), so that a
    resumed run records them as an uninterrupted one would. Not an eval: it
    is kept while it is the latest checkpoint, never as one of the best."""
    if self.ckpt.latest_step() == step:
      return  # An eval at this step saved it.
    meta = self._meta(step)
    meta["open_interval"] = {"first": first, "fetched": [dict(m) for m in fetched]}
    self.ckpt.save(step, state, meta, None)

  def wait_for_checkpoints(self) -> None:
    self.ckpt.wait()
    self.ckpt.close()

  def finish(self, reason: str | None, compute_dtype: str) -> dict[str, Any]:
    """Writes and returns the summary; call `wait_for_checkpoints` first."""
    self.writer.flush()
    best, config = self.best, self.config
    summary = records.summary(
        config, records.COMPLETED if reason is None else records.DIVERGED,
        reason, total_train_steps=self.total_steps, best_step=best.step,
        best_value=best.value, final_step=self.step,
        best_checkpoint=(self.ckpt.step_path(best.step)
                         if best.step is not None else None))
    summary.update(self.throughput.summary())
    summary["perf"]["compute_dtype"] = compute_dtype
    self.throughput.log_input_bound()
    if self.is_writer:
      records.write_summary(self.workdir, summary)
    return summary


def hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config's leaves as TensorBoard hyperparameters (numbers, strings and
  booleans; other values as their text; None left out)."""
  return {k: v if isinstance(v, (bool, int, float, str)) else str(v)
          for k, v in config_paths.flatten(config).items() if v is not None}

