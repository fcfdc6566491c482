"""`train_and_evaluate(config, workdir)`: one trial, from start or resumed.

The loop runs one compiled train step per step with the state donated, keeps
each step's metrics on the device, and fetches them every `log_every_steps`
(and at evals) in one transfer. Evals run every `eval_every_steps` and at the
last step; each eval is followed by a checkpoint, so a resumed run repeats
exactly the steps an uninterrupted run takes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from absl import logging
from clu import metric_writers
from clu import periodic_actions
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tuning_playbook import checkpointing
from tuning_playbook import config_schema
from tuning_playbook import evaluation
from tuning_playbook import input_pipeline
from tuning_playbook import optimizers
from tuning_playbook import records
from tuning_playbook import sharding
from tuning_playbook import train_step as train_step_lib
from tuning_playbook import watchdog
from tuning_playbook import workload as workload_lib

FINISHED = ("completed", "diverged")


@dataclasses.dataclass
class BestCheckpoint:
  """The best eval so far by the configured metric (retrospective selection)."""
  metric: str
  mode: str
  step: int | None = None
  value: float | None = None

  def update(self, step: int, value: float) -> None:
    new = checkpointing.rank_key(value, self.mode)
    if self.step is None or new > checkpointing.rank_key(self.value, self.mode):
      self.step, self.value = step, value


def validate_before_compiling(config: ml_collections.ConfigDict) -> workload_lib.Workload:
  """All checks that need no compilation: config values, workload, devices."""
  config_schema.validate(config)
  workload = workload_lib.load_workload(config.workload)
  config_schema.validate(config, num_devices=jax.device_count())
  if config.batch_size % jax.process_count():
    raise config_schema.ConfigError(
        f"config.batch_size={config.batch_size} is invalid: must be divisible "
        f"by the process count ({jax.process_count()})")
  return workload


def _window_row(step: int, window: list[dict[str, Any]]) -> dict[str, float]:
  losses = np.array([m["train/loss"] for m in window], np.float64)
  norms = np.array([m["train/grad_norm"] for m in window], np.float64)
  return {"step": step,
          "train/loss": float(np.mean(losses)),
          "train/grad_norm": float(np.mean(norms)),
          "train/grad_norm_max": float(np.max(norms)),
          "train/clipped_fraction": float(np.mean([m["train/clipped"] for m in window])),
          "train/learning_rate": float(window[-1]["train/learning_rate"])}


def _divergence(first_step: int, window: list[dict[str, Any]],
                threshold: float) -> str | None:
  for i, m in enumerate(window):
    loss = float(m["train/loss"])
    if not math.isfinite(loss) or loss > threshold:
      return (f"train/loss={loss!r} at step {first_step + i} (steps "
              f"{first_step}..{first_step + len(window) - 1} fetched; "
              f"divergence_loss_threshold={threshold!r})")
  return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds a run); returns the summary."""
  workload = validate_before_compiling(config)
  input_pipeline.hide_accelerators_from_tensorflow()
  is_writer = jax.process_index() == 0
  records.check_or_write_config(workdir, config, write=is_writer)
  previous = records.read_summary(workdir)
  if previous and previous.get("status") in FINISHED:
    logging.info("%s already finished (%s); nothing to do.", workdir,
                 previous["status"])
    return previous

  process_index, process_count = jax.process_index(), jax.process_count()
  mesh = sharding.create_mesh()
  batch_sharding = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  builder = workload.dataset_builder(config)
  stream = input_pipeline.TrainStream(
      builder, workload.splits["train"], workload.preprocess, seed=config.seed,
      local_batch_size=config.batch_size // process_count,
      process_index=process_index, process_count=process_count,
      shuffle_buffer=config.data.shuffle_buffer, cache=config.data.cache)
  eval_local_batch = config_schema.resolved_eval_batch_size(config) // process_count
  validation = input_pipeline.make_eval_split(
      builder, "validation", workload.splits["validation"], workload.preprocess,
      local_batch_size=eval_local_batch, process_index=process_index,
      process_count=process_count, cache=config.data.cache)
  eval_splits = [
      validation,
      input_pipeline.make_eval_split(
          builder, "train", workload.splits["train"], workload.preprocess,
          local_batch_size=eval_local_batch, process_index=process_index,
          process_count=process_count, cache=config.data.cache,
          limit=config.train_eval_subset_size or validation.total_examples),
      input_pipeline.make_eval_split(
          builder, "test", workload.splits["test"], workload.preprocess,
          local_batch_size=eval_local_batch, process_index=process_index,
          process_count=process_count, cache=config.data.cache),
  ]

  model = workload.create_model(config)
  tx = optimizers.create_optimizer(config.optimizer, config.max_train_steps)
  input_spec = stream.dataset(0).element_spec["inputs"]
  sample = jnp.zeros((1,) + tuple(input_spec.shape[1:]), input_spec.dtype.as_numpy_dtype)
  init_fn = lambda: train_step_lib.create_train_state(model, tx, sample, config.seed)
  abstract_state = jax.eval_shape(init_fn)
  state_sharding = jax.tree.map(lambda _: replicated, abstract_state)

  ckpt = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), num_best=config.num_best_checkpoints,
      best_metric=config.best_metric, best_mode=config.best_mode)
  best = BestCheckpoint(config.best_metric, config.best_mode)
  latest = ckpt.latest_step()
  if latest is None:
    state = jax.jit(init_fn, out_shardings=state_sharding)()
    step = 0
  else:
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state, state_sharding)
    state, meta = ckpt.restore(latest, target)
    step = int(meta["step"])
    best.step, best.value = meta["best_step"], meta["best_value"]
    saved_epoch_size = meta["data_position"]["host_examples_per_epoch"]
    if saved_epoch_size != stream.examples_per_epoch:
      raise RuntimeError(
          f"checkpoint {latest} was written with {saved_epoch_size} training "
          f"examples per host epoch, now {stream.examples_per_epoch}: the data "
          "or the process count changed, so the data order cannot be resumed")
    logging.info("Resumed from checkpoint at step %d.", step)

  metrics_log = records.StepLog(os.path.join(workdir, records.METRICS_FILE), is_writer)
  grad_log = records.StepLog(os.path.join(workdir, records.GRAD_NORMS_FILE), is_writer)
  metrics_log.truncate_after(step)
  grad_log.truncate_after(step)

  compiled_train_step = jax.jit(
      train_step_lib.make_train_step(model, tx, workload.loss_fn, config.grad_clip_norm),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, replicated), donate_argnums=0)
  evaluator = evaluation.Evaluator(
      train_step_lib.make_eval_step(model, workload.loss_fn, workload.correct_fn),
      eval_splits, mesh, state_sharding)

  writer = metric_writers.create_default_writer(workdir, just_logging=not is_writer)
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=config.max_train_steps, writer=writer,
      every_steps=config.log_every_steps)
  batches = sharding.prefetch_to_devices(
      stream.iterate(step), batch_sharding, size=config.data.prefetch_batches)

  status, reason = "completed", None
  window: list[dict[str, Any]] = []
  with watchdog.StepWatchdog(config.step_watchdog_seconds) as dog:
    while step < config.max_train_steps:
      state, step_metrics = compiled_train_step(state, next(batches))
      step += 1
      window.append(step_metrics)
      report_progress(step)
      dog.progress(step)
      is_eval = step % config.eval_every_steps == 0 or step == config.max_train_steps
      if step % config.log_every_steps and not is_eval:
        continue
      first = step - len(window) + 1
      fetched = jax.device_get(window)
      window = []
      grad_log.append({"step": first + i, "train/grad_norm": m["train/grad_norm"],
                       "train/loss": m["train/loss"]} for i, m in enumerate(fetched))
      row = _window_row(step, fetched)
      reason = _divergence(first, fetched, config.divergence_loss_threshold)
      if reason is None and is_eval:
        with report_progress.timed("eval"):
          row.update(evaluator.evaluate(state))
        best.update(step, row[config.best_metric])
        meta = {"step": step, "best_step": best.step, "best_value": best.value,
                "data_position": stream.position(step).to_json()}
        ckpt.save(step, state, meta, {config.best_metric: row[config.best_metric]})
        dog.progress(step)
      metrics_log.append([row])
      writer.write_scalars(step, {k: v for k, v in row.items() if k != "step"})
      if reason is not None:
        status = "diverged"
        logging.warning("Diverged: %s", reason)
        break
  ckpt.wait()
  ckpt.close()
  writer.flush()
  summary = {
      "status": status, "reason": reason, "best_step": best.step,
      "best_metric": config.best_metric, "best_mode": config.best_mode,
      "best_value": best.value, "final_step": step,
      "max_train_steps": config.max_train_steps,
      "best_checkpoint": ckpt.step_path(best.step) if best.step is not None else None,
  }
  if is_writer:
    records.write_summary(workdir, summary)
  return summary
