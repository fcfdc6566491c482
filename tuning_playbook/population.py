"""Trains several trials at once as one compiled program with a trial axis.

  trainer = PopulationTrainer([config_a, config_b], [dir_a, dir_b], workload)
  summaries = trainer.train()  # One summary per trial, in order.

Trials that share a structure (`structure_key`: the same config except the
seed and the continuous optimizer hyperparameters, which live in the
optimizer state) stack their parameters, optimizer state (hyperparameters
included), BatchNorm statistics, EMA and RNG along a leading axis, and one
compiled program of the single-run train step trains them all, batched with
`jax.vmap` on accelerators or traced side by side on CPUs (`over_trials`).
Each trial follows
the computation it would follow alone: the same initialisation (its seed),
the same data order (trials with one seed share one stream; otherwise each
has its own order over one in-memory copy of the data, held once on the
devices when small: device_examples.py) and its own
hyperparameters and schedule, including a prepended warmup of its own length.

Each trial keeps the records of a single run (`trial_records.TrialRecords`):
config.json, metrics.jsonl, grad_norms.jsonl, best-N Orbax checkpoints of
its own state (restorable with plain Orbax, resumable by
`tuning_playbook.main` alone) and summary.json. A trial that diverges, or
reaches its last step before the others, is recorded and then frozen (the
step keeps its state unchanged, under a mask) while the others go on.
Trials resume from their checkpoints when they all stopped at the same step;
the study worker groups trials by their resume step (study_worker.py).

Runs in one process, on all of its devices (data parallel, as a single run).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import ml_collections
import numpy as np

from tuning_playbook import config_paths
from tuning_playbook import device_examples
from tuning_playbook import evaluation
from tuning_playbook import input_pipeline
from tuning_playbook import optimizers
from tuning_playbook import records
from tuning_playbook import sharding
from tuning_playbook import throughput
from tuning_playbook import train
from tuning_playbook import train_step as train_step_lib
from tuning_playbook import trial_logs
from tuning_playbook import trial_records
from tuning_playbook import watchdog
from tuning_playbook import workload as workload_lib

# Config keys that may differ between the trials of one population.
VARYING_KEYS = ("seed",) + tuple(f"optimizer.{k}" for k in optimizers.HYPERPARAMETERS)


@dataclasses.dataclass
class _PendingLog:
  """The metrics of a log step for its due trials, on their way to the host;
  per due trial, its interval's first step, start clock and input wait."""
  step: int
  due: list[int]
  evals: list[int]
  first: list[int]
  started: list[float]
  waited: list[float]
  buffer: jax.Array


class PopulationError(ValueError):
  """Trials that cannot be trained as one population."""


def seed_shapes_data(config: ml_collections.ConfigDict,
                     workload: workload_lib.Workload) -> bool:
  """Whether each seed needs a data pipeline of its own (tf.data streams).

  In-memory and synthetic streams give each seed its own order over one
  copy of the data; a tf.data pipeline per trial would not, so trials with
  tf.data input share a population only when their seeds agree.
  """
  return not (config.data.synthetic or train.in_memory_data(config, workload))


def structure_key(config: ml_collections.ConfigDict,
                  workload: workload_lib.Workload) -> str:
  """Trials with equal keys can be trained as one population.

  Everything but `VARYING_KEYS` must agree (model, optimizer and schedule
  names, batch size, step counts, cadences, data, ...): it changes shapes or
  code. The seed must agree too when `seed_shapes_data`.
  """
  varying = set(VARYING_KEYS)
  if seed_shapes_data(config, workload):
    varying.discard("seed")
  flat = config_paths.flatten(records.config_to_dict(config))
  return json.dumps({k: v for k, v in flat.items() if k not in varying},
                    sort_keys=True, default=str)


def _keep_active(active: jax.Array, new: Any, old: Any) -> Any:
  """Leaves of `new` for active trials, of `old` (unchanged) for the others."""
  def keep(n, o):
    return jnp.where(active.reshape(active.shape + (1,) * (n.ndim - 1)), n, o)
  return jax.tree.map(keep, new, old)


def over_trials(fn: Callable, in_axes: Sequence[int | None], num_trials: int,
                mode: str) -> Callable:
  """`fn` applied to each trial's slice of the arguments with a trial axis.

  "vmap" batches the trials into one computation (`jax.vmap`): large kernels,
  what accelerators want. "unroll" traces `fn` once per trial into the same
  program: independent computations, which XLA:CPU runs side by side on its
  cores with the single-trial kernels (about twice as fast as "vmap" for a
  small CNN on 2 cores, at a compile time that grows with the trial count).
  """
  if mode == "vmap":
    return jax.vmap(fn, in_axes=tuple(in_axes))
  if mode != "unroll":
    raise ValueError(f"mode={mode!r}: allowed: vmap, unroll")

  def unrolled(*args):
    outs = [fn(*[a if axis is None else _trial(a, i)
                 for a, axis in zip(args, in_axes)]) for i in range(num_trials)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

  return unrolled


def default_mode() -> str:
  """"unroll" on CPUs, "vmap" on accelerators (see `over_trials`)."""
  return "unroll" if jax.default_backend() == "cpu" else "vmap"


def _trial(tree: Any, index: int) -> Any:
  """One trial's slice of a stacked tree."""
  return jax.tree.map(lambda x: x[index], tree)


def _stream_for(config, workload, builder, base_seed: int, base_stream):
  """The trial's stream: the base one, or its examples in the trial's order."""
  if config.seed == base_seed:
    return base_stream
  if hasattr(base_stream, "with_seed"):
    return base_stream.with_seed(config.seed)
  return train.make_train_stream(config, workload, builder)  # Synthetic: small.


def _cached(cache: dict, key: tuple, make: Callable[[], Any]) -> Any:
  if key not in cache:
    cache[key] = make()
  return cache[key]


class PopulationTrainer:
  """Trains trials of one structure in lockstep; see the module docstring.

  `cache` (a dict the caller keeps between populations, e.g. a study worker)
  keeps data sets, compiled steps and evaluators for the next population of
  the same structure and size.
  """

  def __init__(self, configs: Sequence[ml_collections.ConfigDict],
               workdirs: Sequence[str], workload: workload_lib.Workload,
               cache: dict | None = None, mode: str | None = None):
    if not configs or len(configs) != len(workdirs):
      raise PopulationError(f"{len(configs)} configs for {len(workdirs)} work "
                            "directories: one each, at least one")
    keys = [structure_key(c, workload) for c in configs]
    if len(set(keys)) > 1:
      raise PopulationError(
          "the trials differ in more than " + ", ".join(VARYING_KEYS) +
          "; train them in separate populations")
    if jax.process_count() > 1:
      raise PopulationError("a population trains in one process; run "
                            "multi-process trials alone (tuning_playbook.main)")
    cache = {} if cache is None else cache
    self.configs = list(configs)
    self.num_trials = len(configs)
    config = self.config = configs[0]
    self.compute_dtype = workload_lib.compute_dtype(config).name
    mesh = sharding.create_mesh()
    replicated = sharding.replicated(mesh)
    data_key = json.dumps({"workload": config.workload,
                           "data": records.config_to_dict(config.data),
                           "batch_size": config.batch_size,
                           "eval_batch_size": config.eval_batch_size,
                           "train_eval_subset_size": config.train_eval_subset_size,
                           "seed": config.seed if seed_shapes_data(config, workload)
                                   else None}, sort_keys=True, default=str)
    builder = _cached(cache, ("builder", data_key), lambda: (
        None if config.data.synthetic else
        input_pipeline.prepare_dataset(workload.dataset_builder, config)))
    base_seed, base_stream = _cached(cache, ("stream", data_key), lambda: (
        config.seed, train.make_train_stream(config, workload, builder)))
    streams = [_stream_for(c, workload, builder, base_seed, base_stream)
               for c in configs]
    self.shared_data = len({c.seed for c in configs}) == 1
    # One copy of the training split on the devices, shared by every trial
    # (or {}: batches gathered on the host).
    max_mb = config.data.on_device_max_mb
    self.examples = _cached(cache, ("examples", data_key, max_mb), lambda: (
        device_examples.place(base_stream, mesh, max_mb)))
    on_device = bool(self.examples)

    model = workload.create_model(config)
    tx = optimizers.create_optimizer(config.optimizer, config.max_train_steps)
    input_shape, input_dtype = base_stream.element_spec()
    sample = jnp.zeros((1,) + tuple(input_shape), input_dtype)
    ema = config.ema_decay > 0

    def init_one(key_data, hyperparams):
      state = train_step_lib.create_train_state(model, tx, sample, key_data, ema=ema)
      return state.replace(opt_state=optimizers.with_hyperparameters(
          state.opt_state, hyperparams))

    values = [optimizers.hyperparameter_values(c.optimizer, c.max_train_steps)
              for c in configs]
    hyperparams = [{k: np.float32(v[k]) for k in optimizers.HYPERPARAMETERS}
                   for v in values]
    key_data = [train_step_lib.seed_key_data(c.seed) for c in configs]
    abstract_one = jax.eval_shape(init_one, key_data[0], hyperparams[0])
    abstract_state = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct((self.num_trials,) + a.shape, a.dtype),
        abstract_one)
    one_sharding = jax.tree.map(lambda _: replicated, abstract_one)
    self._abstract_trial = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_one, one_sharding)
    state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
    # Each trial is initialised by the same program as alone, then stacked.
    init_trial = _cached(cache, ("init", keys[0]), lambda: jax.jit(
        init_one, out_shardings=one_sharding))
    stack = _cached(cache, ("stack", keys[0], self.num_trials), lambda: (
        train_step_lib.jit_data_movement(
            lambda *trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees),
            out_shardings=state_sharding)))

    device_kind = jax.devices()[0].device_kind
    self.records = [trial_records.TrialRecords(
        c, d, stream=s, is_writer=True, device_kind=device_kind,
        device_count=jax.device_count())
                    for c, d, s in zip(configs, workdirs, streams)]
    latest = {r.latest_step() for r in self.records}
    if len(latest) > 1:
      raise PopulationError(
          "the trials' latest checkpoints are at different steps "
          f"({sorted(map(str, latest))}); group trials by their resume step")
    latest_step = latest.pop()
    if latest_step is None:
      self.state = stack(*[init_trial(k, h) for k, h in zip(key_data, hyperparams)])
      self.step = 0
    else:
      self.state = stack(*[r.restore(latest_step, self._abstract_trial)
                           for r in self.records])
      self.step = self.records[0].step
      logging.info("Resumed %d trials from their checkpoints at step %d.",
                   self.num_trials, self.step)
    for r in self.records:
      r.open_logs()

    mode = mode or default_mode()
    structure = (keys[0], self.num_trials, self.shared_data, mode)
    batch_sharding = (sharding.stacked_batch_sharding(mesh) if self.shared_data
                      else NamedSharding(mesh, PartitionSpec(None, None,
                                                             sharding.DATA_AXIS)))

    def make_train_step():
      loop = train_step_lib.for_loop(train_step_lib.make_train_step(
          model, tx, workload.loss_fn, config.grad_clip_norm,
          workload.weights_fn, ema_decay=config.ema_decay))
      trained = over_trials(loop, (0, None if self.shared_data else 0, 0, None),
                            self.num_trials, mode)

      def population_step(state, batches, buffer, active, examples):
        new_state, new_buffer = trained(state, batches, buffer, examples)
        return (_keep_active(active, new_state, state),
                _keep_active(active, new_buffer, buffer))

      return jax.jit(population_step,
                     in_shardings=(state_sharding, batch_sharding, replicated,
                                   replicated, replicated),
                     out_shardings=(state_sharding, replicated),
                     donate_argnums=(0, 2))

    self.train_step = _cached(cache, ("train_step",) + structure, make_train_step)
    eval_step = train_step_lib.make_eval_step(
        model, workload.loss_fn, workload.correct_fn, workload.weights_fn)

    def make_evaluators():
      population_evaluator = evaluation.Evaluator(
          # vmap in every mode: unrolled, the eval step compiled 0.5 s longer
          # (4 trials) to save 4 ms per eval.
          jax.vmap(eval_step, in_axes=(0, None)),
          train.make_eval_splits(config, workload, builder), mesh, state_sharding,
          on_device=train.in_memory_data(config, workload))
      # For a trial evaluated alone (at its own last step).
      return population_evaluator, population_evaluator.for_step(
          eval_step, jax.tree.map(lambda _: replicated, abstract_one))

    self.evaluator, self.trial_evaluator = _cached(
        cache, ("evaluators", keys[0], self.num_trials), make_evaluators)
    # One trial's state, to evaluate alone or to checkpoint: one program for
    # the whole tree (indexing leaf by leaf would compile one per shape).
    self._take_trial = _cached(
        cache, ("take_trial",) + structure[:2],
        lambda: train_step_lib.jit_data_movement(_trial, out_shardings=one_sharding))
    self.metrics_buffer = jax.device_put(
        np.zeros((self.num_trials, config.log_every_steps,
                  len(train_step_lib.STEP_METRICS)), np.float32), replicated)
    self._replicated = replicated
    k = config.data.batches_per_transfer
    start = self.step // k * k
    if self.shared_data:
      source = device_examples.transfers(streams[0], start, k, on_device)
    else:
      per_trial = [device_examples.transfers(s, start, k, on_device)
                   for s in streams]
      source = ({name: np.stack([b[name] for b in group]) for name in group[0]}
                for group in zip(*per_trial))
    self.batches = sharding.prefetch_to_devices(
        source, batch_sharding, size=config.data.prefetch_batches)
    self._transfer = None
    self.watchdog = watchdog.Watchdog(config.step_watchdog_seconds,
                                      floor_seconds=config.watchdog_floor_seconds)
    self.summaries: list[dict[str, Any] | None] = [None] * self.num_trials

  def train(self) -> list[dict[str, Any]]:
    """Trains every trial to its last step (or divergence); returns the summaries."""
    config = self.config
    k = config.data.batches_per_transfer
    eval_every, log_every = config.eval_every_steps, config.log_every_steps
    last = [r.total_steps for r in self.records]
    self._active = [self.step < s for s in last]
    with self.watchdog:
      for i, active in enumerate(self._active):
        if not active:
          self._finish(i, None)
    self._active_mask = jax.device_put(np.array(self._active), self._replicated)
    self._ended: list[tuple[int, str | None]] = []
    first = [self.step + 1] * self.num_trials
    clock = time.perf_counter
    started = [clock()] * self.num_trials
    waited = [0.0] * self.num_trials
    compiled = False
    dog = self.watchdog
    pending = None  # The metrics of the last plain log step, if not recorded yet.
    with dog, jax.transfer_guard("disallow"):
      step = self.step
      while any(self._active):
        dog.begin("step", "train step {}", step + 1)
        if self._transfer is None or step % k == 0:
          wait_began = clock()
          self._transfer = next(self.batches)
          if self.metrics_buffer.is_ready():
            waited = [w + clock() - wait_began for w in waited]
          if not compiled:
            self._compile()
            compiled = True
            started, waited = [clock()] * self.num_trials, [0.0] * self.num_trials
        self.state, self.metrics_buffer = self.train_step(
            self.state, self._transfer, self.metrics_buffer, self._active_mask,
            self.examples)
        step += 1
        self.step = step
        if pending is not None and pending.buffer.is_ready():
          with jax.transfer_guard("allow"):
            self._record(pending)
          pending = None
        is_eval = step % eval_every == 0
        due = [i for i, active in enumerate(self._active) if active and (
            is_eval or step % log_every == 0 or step == last[i])]
        if not due:
          continue
        with jax.transfer_guard("allow"):
          if pending is not None:  # Not there yet: wait for it, in order.
            self._record(pending)
            pending = None
            due = [i for i in due if self._active[i]]
          evals = [i for i in due if is_eval or step == last[i]]
          intervals = ([first[i] for i in due], [started[i] for i in due],
                       [waited[i] for i in due])
          if evals:
            self._record(_PendingLog(step, due, evals, *intervals,
                                     self.metrics_buffer))
          elif due:
            # Plain log steps: the metrics come over while training goes on.
            pending = _PendingLog(step, due, [], *intervals,
                                  self.metrics_buffer.copy())
            pending.buffer.copy_to_host_async()
        for i in due:
          first[i], started[i], waited[i] = step + 1, clock(), 0.0
      # Summaries once training is over: waiting for a trial's last
      # checkpoint writes would stall the others.
      with jax.transfer_guard("allow"):
        if pending is not None:
          self._record(pending)
        for i, reason in self._ended:
          self._finish(i, reason)
    return list(self.summaries)

  def _compile(self) -> None:
    """Compiles the population's train step (reading its FLOPs) and its eval
    steps: the population's, and one trial's when trials end apart."""
    compiled = self.train_step.lower(self.state, self._transfer, self.metrics_buffer,
                                     self._active_mask, self.examples).compile()
    flops = throughput.step_flops(compiled, jax.device_count())
    for r in self.records:
      with trial_logs.about(r.workdir):
        r.throughput.set_step_flops(None if flops is None else flops / self.num_trials)
    self.evaluator.compile(self.state)
    if len({r.total_steps for r in self.records}) > 1:
      # Trials that end at different steps are each evaluated alone there.
      self.trial_evaluator.compile(self._abstract_trial)

  def _record(self, fetch: _PendingLog) -> None:
    """Records the steps of `fetch` for its trials; evaluates and
    checkpoints those of `fetch.evals` (at the current step)."""
    step = fetch.step
    self.watchdog.begin("log", "the metrics of step {}", step)
    buffer = np.asarray(jax.device_get(fetch.buffer))
    now = time.perf_counter()
    evaluated: list[dict[str, float]] = []

    def evaluate(i: int) -> tuple[dict[str, float], Any]:
      self.watchdog.begin("eval", "the evals and checkpoints at step {}", step)
      if len(fetch.evals) == 1:  # A trial's own last step: evaluate it alone.
        state = self._take_trial(self.state, i)
        metrics = self.trial_evaluator.evaluate(state)
        if self.config.ema_decay > 0:
          metrics.update(self.trial_evaluator.evaluate(
              train_step_lib.ema_state(state), prefix="eval_ema"))
        return metrics, state
      if not evaluated:
        evaluated.extend(self.evaluator.evaluate_population(self.state, self.num_trials))
        if self.config.ema_decay > 0:
          for metrics, ema in zip(evaluated, self.evaluator.evaluate_population(
              train_step_lib.ema_state(self.state), self.num_trials,
              prefix="eval_ema")):
            metrics.update(ema)
      return evaluated[i], self._take_trial(self.state, i)

    ended = []
    for i, first, started, waited in zip(fetch.due, fetch.first, fetch.started,
                                         fetch.waited):
      rows = buffer[i, [(s - 1) % buffer.shape[1] for s in range(first, step + 1)]]
      fetched = [dict(zip(train_step_lib.STEP_METRICS, map(float, r))) for r in rows]
      with trial_logs.about(self.records[i].workdir):
        reason = self.records[i].log(
            first, step, fetched, seconds=now - started, input_wait=waited,
            evaluate=(lambda i=i: evaluate(i)) if i in fetch.evals else None)
        if reason is not None:
          # Recorded at this log step; a trial seen to diverge in a fetch that
          # came over later trains no further from the next step on (its
          # later updates are never recorded or checkpointed).
          logging.warning("Trial %s diverged: %s", self.records[i].workdir, reason)
      if reason is not None or step == self.records[i].total_steps:
        self._active[i] = False
        ended.append((i, reason))
    if ended:
      self._active_mask = jax.device_put(np.array(self._active), self._replicated)
      self._ended.extend(ended)

  def _finish(self, i: int, reason: str | None) -> None:
    """Writes trial i's summary once its checkpoints are written (watched)."""
    self.watchdog.begin("finish", "the last checkpoint writes (Orbax)")
    with trial_logs.about(self.records[i].workdir):
      self.records[i].wait_for_checkpoints()
      self.summaries[i] = self.records[i].finish(reason, self.compute_dtype)
      logging.info("Trial %s: %s at step %d.", self.records[i].workdir,
                   self.summaries[i]["status"], self.records[i].step)

