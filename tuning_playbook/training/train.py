"""`Trainer`: one trial, or a population of trials, from start or resumed.

  trainer = Trainer([config], [workdir], [workload])  # A plain run: N = 1.
  summaries = trainer.run()  # train() to every trial's last step, finish().

A plain run is a population of one: the same set-up steps
(trial_setup.py), the same loop and the same records (trial_records.py)
train 1..N trials of one structure, their states stacked along a leading
trial axis (population.py). For one trial the program is the single-trial
step itself, traced once (no vmap, no masks).

The loop runs one compiled train step per step with the state donated, keeps
each step's metrics on the device, and fetches them every `log_every_steps`
(and at evals) in one transfer; plain log steps are fetched while training
goes on. Evals run every `eval_every_steps` and at each trial's last step
(`config_schema.total_train_steps`: max_train_steps plus a prepended
warmup); each eval is followed by a checkpoint of that trial, so a resumed
run repeats exactly the steps an uninterrupted run takes (evals and their
EMA scores: log_step_evals.py). Checkpoints are written asynchronously
(Orbax); summaries once training is over, after their checkpoints.

A trial that diverges, or reaches its last step before the others, is
recorded and then frozen under a mask while the others go on. Each log row
holds the interval's throughput (`perf/*`, throughput.py; the clock starts
after compilation and restarts after each log, so evals and checkpoints are
not in it) and each trial writes CLU's progress scalars (trial_runs.py).
Several processes, and `profile_steps`, train one trial at a time
(`population.refusal`).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from tuning_playbook.common import cpu_devices
from tuning_playbook.common import records
from tuning_playbook.common import termination
from tuning_playbook import config_schema
from tuning_playbook import input_pipeline
from tuning_playbook.training import device_examples
from tuning_playbook.training import log_step_evals
from tuning_playbook.training import population
from tuning_playbook.training import preemption
from tuning_playbook.training import profiling
from tuning_playbook.training import sharding
from tuning_playbook.training import throughput
from tuning_playbook.training import trial_logs
from tuning_playbook.training import trial_records
from tuning_playbook.training import trial_runs
from tuning_playbook.training import trial_setup
from tuning_playbook.training import watchdog
from tuning_playbook import workload as workload_lib

ResumeError = trial_records.ResumeError
validate_before_compiling = trial_setup.validate_before_compiling


class Trainer:
  """Trains 1..N trials of one structure; see the module docstring.

  Building it claims each trial's directory and restores the trials' latest
  checkpoints (all at one step) if there are any; `train(until)` advances;
  `finish()` waits for checkpoints and writes the summaries. `cache` (kept
  by a study worker between populations) reuses data and programs.
  """

  # The clock of the log intervals' throughput and input wait, in seconds.
  clock = staticmethod(time.perf_counter)

  def __init__(self, configs: Sequence[ml_collections.ConfigDict],
               workdirs: Sequence[str],
               workloads: Sequence[workload_lib.Workload], *,
               cache: trial_setup.SetupCache | None = None,
               mode: str | None = None):
    if not configs or not len(configs) == len(workdirs) == len(workloads):
      raise population.PopulationError(
          f"{len(configs)} configs, {len(workdirs)} work directories and "
          f"{len(workloads)} workloads: one each, at least one")
    refusal = population.refusal(configs, workloads)
    if refusal is not None:
      raise population.PopulationError(refusal)
    cache = trial_setup.SetupCache() if cache is None else cache
    self.configs = list(configs)
    self.num_trials = len(configs)
    config = self.config = configs[0]
    self.is_writer = jax.process_index() == 0
    self.compute_dtype = workload_lib.compute_dtype(config).name
    logging.info("The model computes in %s (config.compute_dtype=%r).",
                 self.compute_dtype, config.compute_dtype)
    input_pipeline.hide_accelerators_from_tensorflow()
    mesh = sharding.create_mesh(config)
    self._replicated = sharding.replicated(mesh)
    data = cache.data_for(config, workloads[0], mesh)
    streams = [data.stream_for(c, w) for c, w in zip(configs, workloads)]
    # Traced hyperparameters that differ between the trials are the
    # programs' arguments; the others are compiled in, as alone.
    traced = population.traced_keys(configs, workloads[0])
    spec = trial_setup.ProgramSpec(
        structure=population.structure_key(config, workloads[0], traced),
        num_trials=self.num_trials,
        shared_data=len({c.seed for c in configs}) == 1,
        mode=mode or population.default_mode(self.num_trials), traced=traced)
    # {key: float32[num_trials]}, on the host (evals) and on the devices.
    self._host_hyperparams = population.traced_values(configs, traced)
    self.hyperparams = jax.device_put(self._host_hyperparams, self._replicated)
    self.programs = cache.programs_for(spec, config, workloads[0], data, mesh)
    self.train_step = self.programs.train_step
    logging.info("Mesh %s; %.4g MiB of each trial's state per device.",
                 dict(mesh.shape),
                 sharding.bytes_per_device(self.programs.abstract_trial) / 2**20)
    # The directories are claimed only once the configs are known to work.
    self.trials = [trial_runs.TrialRun(trial_records.TrialRecords(
        c, d, stream=s, is_writer=self.is_writer,
        device_kind=jax.devices()[0].device_kind, device_count=jax.device_count()),
                             last_step=config_schema.total_train_steps(c), active=True)
                   for c, d, s in zip(configs, workdirs, streams)]
    self.watchdog = watchdog.Watchdog(config.step_watchdog_seconds,
                                      floor_seconds=config.watchdog_floor_seconds)
    self.state, self.step = trial_runs.restore_or_init(self.programs, self.trials)
    trial_runs.open_logs(self.trials, self.step)
    self.metrics_buffer = jax.device_put(
        trial_runs.resumed_metrics(self.trials, config.log_every_steps), self._replicated)
    self.examples = data.examples
    logging.info("Training batches are gathered %s.",
                 "on the devices" if self.examples else "on the host")
    k = config.data.batches_per_transfer  # From the current step's transfer:
    self.batches = sharding.prefetch_to_devices(device_examples.population_transfers(
        streams, self.step // k * k, k, bool(self.examples), spec.shared_data),
        self.programs.batch_sharding, size=config.data.prefetch_batches)
    self._transfer = None
    self._active_mask = None
    self._compiled = False
    profile = (config_schema.profile_step_range(config)
               if self.is_writer or config.profile_all_processes else None)
    self.profiler = profiling.StepProfiler(
        profile, profiling.profile_dir(workdirs[0], jax.process_index()), self.step)

  @property
  def records(self) -> list[trial_records.TrialRecords]:
    return [t.records for t in self.trials]

  @property
  def total_steps(self) -> int:
    """The last step of the trial that trains longest."""
    return max(t.last_step for t in self.trials)

  def _update_mask(self) -> None:
    self._active_mask = jax.device_put(
        np.array([t.active for t in self.trials]), self._replicated)

  def run(self) -> list[dict[str, Any]]:
    """Trains every trial to its last step (or divergence); returns the summaries."""
    self.train()
    return self.finish()

  def train(self, until_step: int | None = None) -> list[str | None]:
    """Trains the active trials up to `until_step` (default: their last
    steps); returns each trial's divergence reason (None: none)."""
    config = self.config
    until = self.total_steps if until_step is None else until_step
    # Plain ints: ConfigDict lookups are slow enough to show in a step.
    k = config.data.batches_per_transfer
    eval_every, log_every = config.eval_every_steps, config.log_every_steps
    ends = {t.last_step for t in self.trials} | {until}
    profile_start, profile_stop = self.profiler.start_after, self.profiler.stop_after
    self._restart_clocks()
    self._update_mask()
    pending = None  # The metrics of the last plain log step, if not recorded yet.
    stopped = False
    # Between log steps nothing may move between host and devices on this
    # thread: an accidental per-step sync raises instead of slowing training.
    dog = self.watchdog
    deadline = config.preemption_deadline_seconds
    with termination.stop_requests(deadline) as request, preemption.StopStep(
        request, start_step=self.step, name=self.trials[0].records.workdir,
        timeout_seconds=deadline) as stop, dog, jax.transfer_guard("disallow"):
      step = self.step
      while step < until and any(t.active for t in self.trials):
        if stop.reached(step):
          stopped = True
          break
        dog.begin("step", "train step {}", step + 1)
        if self._transfer is None or step % k == 0:
          self._next_transfer()
        if step == profile_start:
          self._shift_intervals(self.profiler.start(self.state))
        self.state, self.metrics_buffer = self.train_step(
            self.state, self._transfer, self.metrics_buffer, self._active_mask,
            self.examples, self.hyperparams)
        step += 1
        self.step = step
        if step == profile_stop:
          self._shift_intervals(self.profiler.stop(self.state))
        if pending is not None and pending.buffer.is_ready():
          with jax.transfer_guard("allow"):
            self._record(pending)
          pending = None
        if step % log_every and step % eval_every and step not in ends:
          continue
        pending = self._log_step(step, until, pending)
      if pending is not None:
        with jax.transfer_guard("allow"):
          self._record(pending)
      if stopped:
        with jax.transfer_guard("allow"):
          self._save_to_resume()
        raise termination.Preempted(self.step)
    return [t.reason for t in self.trials]

  def _save_to_resume(self) -> None:
    """On SIGTERM: checkpoints every active trial at the current step with
    its steps not yet recorded, waits for the writes and flushes the logs."""
    step = self.step
    self.watchdog.begin("finish", "the checkpoints on SIGTERM at step {}", step)
    buffer = np.asarray(jax.device_get(self.metrics_buffer))
    for i, t in enumerate(self.trials):
      if not t.active:
        continue
      with trial_logs.about(t.records.workdir):
        t.records.save_to_resume(
            step, self.programs.take_trial(self.state, i), t.first,
            trial_runs.fetched_rows(buffer, i, t.first, step))
    for t in self.trials:
      with trial_logs.about(t.records.workdir):
        t.records.wait_for_checkpoints()
        t.records.writer.flush()
        logging.info("Stopped on SIGTERM at step %d; relaunching resumes "
                     "from there.", step)

  def _restart_clocks(self, trials: Sequence[trial_runs.TrialRun] | None = None,
                      first: int | None = None) -> None:
    """Restarts the interval clocks (compilation is not throughput); with
    `first`, opens the next log interval of `trials` at that step."""
    now = self.clock()
    for t in self.trials if trials is None else trials:
      t.started, t.waited = now, 0.0
      t.first = t.first if first is None else first

  def _shift_intervals(self, seconds: float) -> None:
    """Leaves `seconds` (a profiler's start or stop) out of the intervals."""
    for t in self.trials:
      t.started += seconds

  def _next_transfer(self) -> None:
    """Takes the next transfer (k steps' batches); compiles at the first."""
    wait_began = self.clock()
    self._transfer = next(self.batches)
    # Dispatch is asynchronous: a wait while the devices still run earlier
    # steps costs nothing. It counts once they have finished them all (a
    # query, not a sync).
    if self.metrics_buffer.is_ready():
      waited = self.clock() - wait_began
      for t in self.trials:
        t.waited += waited
    if not self._compiled:
      self._compile()
      # Pipeline start-up and compilation are not the run's throughput.
      self._restart_clocks()

  def _log_step(self, step: int, until: int,
                pending: trial_runs.PendingLog | None) -> trial_runs.PendingLog | None:
    """Records, or starts fetching, the metrics of the trials due at `step`;
    returns the fetch still on its way, if any."""
    is_eval = step % self.config.eval_every_steps == 0
    is_log = step % self.config.log_every_steps == 0
    due = [i for i, t in enumerate(self.trials) if t.active and (
        is_eval or is_log or step in (t.last_step, until))]
    if not due:
      return pending
    for i in due:
      with trial_logs.about(self.trials[i].records.workdir):
        self.trials[i].progress(step)
    with jax.transfer_guard("allow"):
      if pending is not None:  # Not there yet: wait for it, in order.
        self._record(pending)
        pending = None
        due = [i for i in due if self.trials[i].active]
      evals = [i for i in due if is_eval or step == self.trials[i].last_step]
      fetch = trial_runs.PendingLog(step, due, evals, [self.trials[i].first for i in due],
                          [self.trials[i].started for i in due],
                          [self.trials[i].waited for i in due], self.metrics_buffer)
      if evals or step == until:
        self._record(fetch)
      elif due:
        # Plain log steps: the metrics come over while training goes on.
        fetch.buffer = self.metrics_buffer.copy()
        fetch.buffer.copy_to_host_async()
        pending = fetch
    self._restart_clocks([self.trials[i] for i in due], first=step + 1)
    return pending

  def lower_train_step(self) -> jax.stages.Lowered:
    """The train step lowered for the state and the current transfer (the
    first, taken now if training has not begun)."""
    if self._transfer is None:
      self._transfer = next(self.batches)
    if self._active_mask is None:
      self._update_mask()
    return self.train_step.lower(self.state, self._transfer, self.metrics_buffer,
                                 self._active_mask, self.examples, self.hyperparams)

  def _compile(self) -> None:
    """Compiles the train step for the first transfer (reading its FLOPs)
    and the eval steps: a trial's alone, and the population's for N > 1.

    The jitted steps' caches keep these compilations: their calls reuse them.
    """
    compiled = self.lower_train_step().compile()
    flops = throughput.step_flops(compiled, jax.device_count())
    for t in self.trials:
      with trial_logs.about(t.records.workdir):
        t.records.throughput.set_step_flops(
            None if flops is None else flops / self.num_trials)
    if self.programs.population_evaluator is not None:
      self.programs.population_evaluator.compile((self.state, self.hyperparams))
    if self.num_trials == 1 or len({t.last_step for t in self.trials}) > 1:
      # A trial alone, or trials that end apart (each evaluated alone then).
      self.programs.trial_evaluator.compile(
          (self.programs.abstract_trial, log_step_evals.trial_values(self._host_hyperparams, 0)))
    self._compiled = True

  def _record(self, fetch: trial_runs.PendingLog) -> None:
    """Records the steps of `fetch` for its trials; evaluates and
    checkpoints those of `fetch.evals` (at the current step)."""
    step = fetch.step
    self.watchdog.begin("log", "the metrics of steps {}..{}", min(fetch.first), step)
    buffer = np.asarray(jax.device_get(fetch.buffer))
    now = self.clock()
    if fetch.evals:
      self.watchdog.begin("eval", "the eval and checkpoint at step {}", step)
      # The moving averages evaluated and saved must be the same everywhere.
      sharding.check_replicas_identical(self.state.batch_stats, "batch_stats")
    evals = log_step_evals.LogStepEvals(
        self.programs, self.state, self.hyperparams, self._host_hyperparams,
        num_trials=self.num_trials, num_due=len(fetch.evals),
        ema=self.config.ema_decay > 0)

    def evaluate(i: int) -> tuple[dict[str, float], Any]:
      self.watchdog.begin("eval", "the eval and checkpoint at step {}", step)
      with self.trials[i].progress.timed("eval"):
        return evals(i)

    ended = False
    for i, first, started, waited in zip(fetch.due, fetch.first, fetch.started,
                                         fetch.waited):
      t = self.trials[i]
      fetched = trial_runs.fetched_rows(buffer, i, first, step)
      with trial_logs.about(t.records.workdir):
        reason = t.records.log(
            first, step, fetched, seconds=now - started, input_wait=waited,
            evaluate=(lambda i=i: evaluate(i)) if i in fetch.evals else None)
        if reason is not None:
          # Recorded at this log step; a trial seen to diverge in a fetch that
          # came over later trains no further from the next step on (its
          # later updates are never recorded or checkpointed).
          logging.warning("Diverged: %s", reason)
      if reason is not None or step == t.last_step:
        t.active, t.reason, ended = False, reason, True
    if ended:
      self._update_mask()

  def finish(self) -> list[dict[str, Any] | None]:
    """Waits for each trial's checkpoints; writes and returns the summaries
    of the trials that ended (None for one stopped before its last step,
    which resumes from its latest checkpoint)."""
    self.profiler.close(self.state, self.step)
    with self.watchdog:
      for t in self.trials:
        if t.summary is not None:
          continue
        self.watchdog.begin("finish", "the last checkpoint writes (Orbax)")
        with trial_logs.about(t.records.workdir):
          t.records.wait_for_checkpoints()
          if t.active:  # Stopped early (train(until_step)): not ended.
            t.records.writer.flush()
            continue
          t.summary = t.records.finish(t.reason, self.compute_dtype)
          logging.info("Trial %s: %s at step %d.", t.records.workdir,
                       t.summary["status"], t.records.step)
    return [t.summary for t in self.trials]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       cache: trial_setup.SetupCache | None = None) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds a run); returns the summary."""
  cpu_devices.configure_thread_pool()
  workload = validate_before_compiling(config)
  records.check_or_write_config(workdir, config, write=False)
  previous = records.read_summary(workdir)
  if previous and previous.get("status") in records.FINISHED_STATUSES:
    logging.info("%s already finished (%s); nothing to do.", workdir,
                 previous["status"])
    return previous
  return Trainer([config], [workdir], [workload], cache=cache).run()[0]
