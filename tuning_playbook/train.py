"""`train_and_evaluate(config, workdir)`: one trial, from start or resumed.

The loop runs one compiled train step per step with the state donated, keeps
each step's metrics on the device, and fetches them every `log_every_steps`
(and at evals) in one transfer. Evals run every `eval_every_steps` and at the
last step (`config_schema.total_train_steps`: max_train_steps plus a prepended
warmup); each eval is followed by a checkpoint, so a resumed run repeats
exactly the steps an uninterrupted run takes. With `ema_decay > 0` each eval
also scores the moving average of the parameters (`eval_ema/<split>/...`,
see train_step.py), which the checkpoints hold beside the raw parameters.
In-memory data sets (no `preprocess`, `data.cache`) are evaluated from batches
kept on the devices; checkpoints are written asynchronously (Orbax), and the
loop waits only for the previous save when starting the next, and at the end.

Each log row also holds the interval's throughput (`perf/*`, see
throughput.py): examples/s, FLOP/s and MFU from XLA's cost analysis of the
compiled step, and the share of the interval the loop waited for its next
batch (input-bound above `input_bound_warning_fraction`). The interval clock
starts after the step is compiled and restarts after each log, so compilation,
evals and checkpoints are not in it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from absl import logging
from clu import periodic_actions
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tuning_playbook import config_schema
from tuning_playbook import cpu_devices
from tuning_playbook import device_examples
from tuning_playbook import distributed
from tuning_playbook import evaluation
from tuning_playbook import in_memory_stream
from tuning_playbook import input_pipeline
from tuning_playbook import optimizers
from tuning_playbook import profiling
from tuning_playbook import records
from tuning_playbook import sharding
from tuning_playbook import synthetic_data
from tuning_playbook import throughput
from tuning_playbook import trial_records
from tuning_playbook import train_step as train_step_lib
from tuning_playbook import watchdog
from tuning_playbook import workload as workload_lib

ResumeError = trial_records.ResumeError
BestCheckpoint = trial_records.BestCheckpoint


def validate_before_compiling(config: ml_collections.ConfigDict) -> workload_lib.Workload:
  """All checks that need no compilation: config values, workload, devices."""
  config_schema.validate(config)
  workload = workload_lib.load_workload(config.workload, config)
  workload_lib.check_model_config(config, workload)
  if config.data.synthetic:
    synthetic_data.workload_spec(config, workload)
  config_schema.validate(config, num_devices=jax.device_count())
  if config.batch_size % jax.process_count():
    raise config_schema.ConfigError(
        f"config.batch_size={config.batch_size} is invalid: must be divisible "
        f"by the process count ({jax.process_count()})")
  return workload


def make_eval_splits(config, workload, builder) -> list[input_pipeline.EvalSplit]:
  local_batch = config_schema.resolved_eval_batch_size(config) // jax.process_count()
  if config.data.synthetic:
    # Random labels score the same on any number of examples: one batch of
    # the training size (or eval_batch_size, when set) is enough.
    global_batch = config.eval_batch_size or config.batch_size
    return synthetic_data.make_eval_splits(
        synthetic_data.workload_spec(config, workload), seed=config.seed,
        local_batch_size=global_batch // jax.process_count(), process_index=jax.process_index(),
        process_count=jax.process_count())
  common = dict(local_batch_size=local_batch, process_index=jax.process_index(),
                process_count=jax.process_count(), cache=config.data.cache)
  validation = input_pipeline.make_eval_split(
      builder, "validation", workload.splits["validation"], workload.preprocess, **common)
  train_subset = input_pipeline.make_eval_split(
      builder, "train", workload.splits["train"], workload.preprocess,
      limit=config.train_eval_subset_size or validation.total_examples, **common)
  test = input_pipeline.make_eval_split(
      builder, "test", workload.splits["test"], workload.preprocess, **common)
  return [validation, train_subset, test]


def in_memory_data(config, workload) -> bool:
  """Whether the data set is held in memory: the train stream as numpy
  arrays, the eval batches on the devices."""
  return (not config.data.synthetic and config.data.cache
          and not workload.custom_preprocess)


def make_train_stream(config, workload, builder):
  """Random batches for synthetic data; in-memory arrays when nothing runs
  per example; else tf.data."""
  common = dict(seed=config.seed,
                local_batch_size=config.batch_size // jax.process_count(),
                process_index=jax.process_index(), process_count=jax.process_count())
  if config.data.synthetic:
    return synthetic_data.SyntheticTrainStream(
        synthetic_data.workload_spec(config, workload), **common)
  if in_memory_data(config, workload):
    return in_memory_stream.InMemoryTrainStream(
        builder, workload.splits["train"], input_key=workload.input_key,
        label_key=workload.label_key, **common)
  return input_pipeline.TrainStream(
      builder, workload.splits["train"], workload.preprocess,
      shuffle_buffer=config.data.shuffle_buffer, cache=config.data.cache, **common)


@dataclasses.dataclass
class _PendingFetch:
  """The metrics of steps first..last, on their way to the host."""
  first: int
  last: int
  started: float
  input_wait: float
  buffer: jax.Array


class Trainer:
  """One trial's compiled steps, data, state and records.

  Building it restores the latest checkpoint if there is one; `train(until)`
  advances to a step; `finish()` waits for checkpoints and writes the summary.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               workload: workload_lib.Workload):
    self.config = config
    self.workdir = workdir
    # The run's last step: max_train_steps plus a prepended warmup.
    self.total_steps = config_schema.total_train_steps(config)
    self.is_writer = jax.process_index() == 0
    mesh = sharding.create_mesh()
    replicated = sharding.replicated(mesh)
    builder = (None if config.data.synthetic else
               input_pipeline.prepare_dataset(workload.dataset_builder, config))
    self.stream = make_train_stream(config, workload, builder)

    model = workload.create_model(config)
    self.compute_dtype = workload_lib.compute_dtype(config).name
    logging.info("The model computes in %s (config.compute_dtype=%r).",
                 self.compute_dtype, config.compute_dtype)
    tx = optimizers.create_optimizer(config.optimizer, config.max_train_steps)
    input_shape, input_dtype = self.stream.element_spec()
    sample = jnp.zeros((1,) + tuple(input_shape), input_dtype)
    init_fn = lambda key_data: train_step_lib.create_train_state(
        model, tx, sample, key_data, ema=config.ema_decay > 0)
    key_data = train_step_lib.seed_key_data(config.seed)
    # Traces the model; compiles nothing. `config.model` was checked before:
    # an error here is in the workload's code and keeps its traceback.
    abstract_state = jax.eval_shape(init_fn, key_data)
    state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
    # The run's directory is claimed only once its config is known to work.
    self.records = trial_records.TrialRecords(
        config, workdir, stream=self.stream, is_writer=self.is_writer,
        device_kind=jax.devices()[0].device_kind, device_count=jax.device_count())
    self.watchdog = watchdog.Watchdog(config.step_watchdog_seconds,
                                      floor_seconds=config.watchdog_floor_seconds)
    latest = self.records.latest_step()
    if latest is None:
      self.state = jax.jit(init_fn, out_shardings=state_sharding)(key_data)
      self.step = 0
    else:
      self.state = self.records.restore(latest, jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
          abstract_state, state_sharding))
      self.step = self.records.step
      logging.info("Resumed from checkpoint at step %d.", self.step)

    # Every process must resume from the same step (a shared file system that
    # is not shared, say, would silently split the job).
    distributed.agree("resume", str(self.step), timeout_seconds=max(
        600.0, config.step_watchdog_seconds, config.watchdog_floor_seconds))
    self.records.open_logs()

    self.step_fn = train_step_lib.make_train_step(
        model, tx, workload.loss_fn, config.grad_clip_norm, workload.weights_fn,
        ema_decay=config.ema_decay)
    stacked_sharding = sharding.stacked_batch_sharding(mesh)
    self.train_step = jax.jit(
        train_step_lib.for_loop(self.step_fn),
        in_shardings=(state_sharding, stacked_sharding, replicated, replicated),
        out_shardings=(state_sharding, replicated), donate_argnums=(0, 2))
    self.metrics_buffer = jax.device_put(
        np.zeros((config.log_every_steps, len(train_step_lib.STEP_METRICS)),
                 np.float32), replicated)
    self.evaluator = evaluation.Evaluator(
        train_step_lib.make_eval_step(model, workload.loss_fn, workload.correct_fn,
                                      workload.weights_fn),
        make_eval_splits(config, workload, builder), mesh, state_sharding,
        on_device=in_memory_data(config, workload))
    # Called at log steps only, which is all it needs to report steps/s.
    self.report_progress = periodic_actions.ReportProgress(
        num_train_steps=self.total_steps, writer=self.records.writer,
        every_steps=None, every_secs=None,
        on_steps=range(0, self.total_steps + 1, config.log_every_steps))
    # The training split on every device (transfers carry indices), or {}.
    self.examples = device_examples.place(self.stream, mesh,
                                          config.data.on_device_max_mb)
    logging.info("Training batches are gathered %s.",
                 "on the devices" if self.examples else "on the host")
    k = config.data.batches_per_transfer
    self._transfer_start = self.step // k * k
    self.batches = sharding.prefetch_to_devices(
        device_examples.transfers(self.stream, self._transfer_start, k,
                                  on_device=bool(self.examples)),
        stacked_sharding, size=config.data.prefetch_batches)
    self._transfer = None
    self._compiled = False
    self.profiler = profiling.StepProfiler(
        config_schema.profile_step_range(config)
        if self.is_writer or config.profile_all_processes else None,
        profiling.profile_dir(workdir, jax.process_index()), self.step)

  def train(self, until_step: int) -> str | None:
    """Trains up to `until_step`; returns the divergence reason, if any."""
    config = self.config
    # Plain ints: ConfigDict lookups are slow enough to show in a step.
    k = config.data.batches_per_transfer
    eval_every, log_every = config.eval_every_steps, config.log_every_steps
    last_step = self.total_steps
    profile_start = self.profiler.start_after
    profile_stop = self.profiler.stop_after
    first_unlogged = self.step + 1
    clock = time.perf_counter
    # Between log steps nothing may move between host and devices on this
    # thread: an accidental per-step sync raises instead of slowing training.
    dog = self.watchdog
    with dog, jax.transfer_guard("disallow"):
      step = self.step
      # The log interval's start, and its seconds spent waiting for input
      # with nothing left for the devices to do.
      started, waited = clock(), 0.0
      pending = None  # The metrics of the last log step, if not recorded yet.
      while step < until_step:
        dog.begin("step", "train step {}", step + 1)
        if self._transfer is None or step % k == 0:
          wait_began = clock()
          self._transfer = next(self.batches)
          # Dispatch is asynchronous: a wait while the devices still run
          # earlier steps costs nothing. It counts once they have finished
          # them all (a query, not a sync).
          if self.metrics_buffer.is_ready():
            waited += clock() - wait_began
          if not self._compiled:
            self._compile_step()
            # Pipeline start-up and compilation are not the run's throughput.
            started, waited = clock(), 0.0
        if step == profile_start:
          started += self.profiler.start(self.state)
        self.state, self.metrics_buffer = self.train_step(
            self.state, self._transfer, self.metrics_buffer, self.examples)
        step += 1
        self.step = step
        if step == profile_stop:
          started += self.profiler.stop(self.state)
        if pending is not None and pending.buffer.is_ready():
          reason, pending = self._finish_fetch(pending), None
          if reason is not None:
            return reason
        is_eval = step % eval_every == 0 or step == last_step
        if step % log_every and not is_eval and step != until_step:
          continue
        self.report_progress(step)
        if pending is not None:  # Not there yet: wait for it, in order.
          reason, pending = self._finish_fetch(pending), None
          if reason is not None:
            return reason
        if is_eval or step == until_step:
          reason = self._log(first_unlogged, is_eval, started, waited)
        else:
          # A plain log step: the metrics come over while training goes on.
          pending = _PendingFetch(first_unlogged, step, started, waited,
                                  self.metrics_buffer.copy())
          pending.buffer.copy_to_host_async()
          reason = None
        first_unlogged = step + 1
        started, waited = clock(), 0.0
        if reason is not None:
          logging.warning("Diverged: %s", reason)
          return reason
    return None

  def _finish_fetch(self, pending: _PendingFetch) -> str | None:
    """Records the steps of a fetch started at a log step; their time ends
    now, when the devices are seen to have finished them."""
    reason = self._log(pending.first, False, pending.started, pending.input_wait,
                       last=pending.last, buffer=pending.buffer)
    if reason is not None:
      # The run ends at the interval that diverged; the steps trained since
      # are dropped (no checkpoint follows a divergence).
      self.step = pending.last
      logging.warning("Diverged: %s", reason)
    return reason

  def _compile_step(self) -> None:
    """Compiles the train step for the first transfer (reading its FLOPs)
    and the eval step.

    The jitted steps' caches keep these compilations: their calls reuse them.
    """
    compiled = self.train_step.lower(
        self.state, self._transfer, self.metrics_buffer, self.examples).compile()
    self.records.throughput.set_step_flops(throughput.step_flops(compiled, jax.device_count()))
    self.evaluator.compile(self.state)
    self._compiled = True

  def _log(self, first: int, is_eval: bool, started: float, input_wait: float,
           last: int | None = None, buffer: jax.Array | None = None) -> str | None:
    """Fetches the metrics of steps first..last (one transfer), evaluates, checkpoints.

    `last` defaults to the current step and `buffer` to the live metrics
    buffer; `started` is the clock at the interval's start, `input_wait` its
    seconds spent waiting for batches.
    """
    with jax.transfer_guard("allow"):
      return self._log_allowed(first, is_eval, started, input_wait,
                               self.step if last is None else last,
                               self.metrics_buffer if buffer is None else buffer)

  def _log_allowed(self, first: int, is_eval: bool, started: float,
                   input_wait: float, step: int, buffer: jax.Array) -> str | None:
    self.watchdog.begin("log", "the metrics of steps {}..{}", first, step)
    buffer = np.asarray(jax.device_get(buffer))
    # The fetch waited for the interval's last step: its time is all the steps'.
    seconds = time.perf_counter() - started
    rows = buffer[[(s - 1) % len(buffer) for s in range(first, step + 1)]]
    fetched = [dict(zip(train_step_lib.STEP_METRICS, map(float, r))) for r in rows]
    return self.records.log(first, step, fetched, seconds=seconds,
                            input_wait=input_wait,
                            evaluate=self._evaluate if is_eval else None)

  def _evaluate(self) -> tuple[dict[str, float], train_step_lib.TrainState]:
    """The eval metrics at this step, and the state to checkpoint."""
    self.watchdog.begin("eval", "the eval and checkpoint at step {}", self.step)
    # The moving averages evaluated and saved must be the same everywhere.
    sharding.check_replicas_identical(self.state.batch_stats, "batch_stats")
    with self.report_progress.timed("eval"):
      metrics = self.evaluator.evaluate(self.state)
      if self.config.ema_decay > 0:
        metrics.update(self.evaluator.evaluate(
            train_step_lib.ema_state(self.state), prefix="eval_ema"))
    return metrics, self.state

  def finish(self, reason: str | None) -> dict[str, Any]:
    """Waits for pending checkpoints, then writes and returns the summary."""
    self.profiler.close(self.state, self.step)
    with self.watchdog:
      self.watchdog.begin("finish", "the last checkpoint writes (Orbax)")
      self.records.wait_for_checkpoints()
    return self.records.finish(reason, self.compute_dtype)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds a run); returns the summary."""
  cpu_devices.configure_thread_pool()
  workload = validate_before_compiling(config)
  input_pipeline.hide_accelerators_from_tensorflow()
  records.check_or_write_config(workdir, config, write=False)
  previous = records.read_summary(workdir)
  if previous and previous.get("status") in records.FINISHED_STATUSES:
    logging.info("%s already finished (%s); nothing to do.", workdir,
                 previous["status"])
    return previous
  trainer = Trainer(config, workdir, workload)
  reason = trainer.train(trainer.total_steps)
  return trainer.finish(reason)
