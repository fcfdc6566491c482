"""The named set-up steps of training, for one trial or a population.

  workload = validate_before_compiling(config)      # No compilation.
  data = build_data(config, workload, mesh)         # Streams, eval splits.
  programs = build_programs(ProgramSpec(...), ...)  # Jitted, not compiled.

`train.Trainer` runs these steps for 1..N trials; a long-lived caller (a
study worker) keeps a `SetupCache` so that the next population reuses what
it may: data by `data_key` (what the workload's data functions can read),
programs by `ProgramSpec` (the trials' structure, count, data sharing and
mode). Workload functions are always bound to each trial's own config
(`validate_before_compiling`); only programs whose structure key (every key
but the seed and the optimizer's continuous hyperparameters) is equal are
shared, so a cached program computes what each trial's config says.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tuning_playbook.common import config_validation
from tuning_playbook.common import records
from tuning_playbook import config_paths
from tuning_playbook import config_schema
from tuning_playbook import input_pipeline
from tuning_playbook.training import device_examples
from tuning_playbook.training import evaluation
from tuning_playbook.training import in_memory_stream
from tuning_playbook.training import optimizers
from tuning_playbook.training import population
from tuning_playbook.training import sharding
from tuning_playbook.training import synthetic_data
from tuning_playbook.training import train_step as train_step_lib
from tuning_playbook import workload as workload_lib

# Config keys that only the training loop reads, never the data functions.
_LOOP_ONLY_KEYS = ("max_train_steps", "eval_every_steps", "log_every_steps",
                   "num_best_checkpoints", "best_metric", "best_mode",
                   "grad_clip_norm", "ema_decay", "divergence_loss_threshold",
                   "step_watchdog_seconds", "watchdog_floor_seconds",
                   "preemption_deadline_seconds", "require_accelerator",
                   "input_bound_warning_fraction", "profile_steps",
                   "profile_all_processes")


def validate_before_compiling(config: ml_collections.ConfigDict) -> workload_lib.Workload:
  """All checks that need no compilation: config values, workload, devices.

  Returns the workload with its functions bound to this config.
  """
  config_validation.validate(config)
  workload = workload_lib.load_workload(config.workload, config)
  workload_lib.check_model_config(config, workload)
  if config.data.synthetic:
    synthetic_data.workload_spec(config, workload)
  config_validation.validate(config, num_devices=jax.device_count())
  if config.batch_size % jax.process_count():
    raise config_schema.ConfigError(
        f"config.batch_size={config.batch_size} is invalid: must be divisible "
        f"by the process count ({jax.process_count()})")
  return workload


def in_memory_data(config, workload) -> bool:
  """Whether the data set is held in memory: the train stream as numpy
  arrays, the eval batches on the devices."""
  return in_memory_stream.used_for(config, workload)


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


def make_eval_splits(config, workload, builder) -> list[input_pipeline.EvalSplit]:
  """Validation, a fixed subset of train, and test (the same for every seed)."""
  if config.data.synthetic:
    # Random labels score the same on any number of examples: one batch of
    # the training size (or eval_batch_size, when set) is enough.
    global_batch = config.eval_batch_size or config.batch_size
    return synthetic_data.make_eval_splits(
        synthetic_data.workload_spec(config, workload),
        local_batch_size=global_batch // jax.process_count(),
        process_index=jax.process_index(), process_count=jax.process_count())
  local_batch = config_schema.resolved_eval_batch_size(config) // jax.process_count()
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


def data_key(config: ml_collections.ConfigDict,
             workload: workload_lib.Workload) -> str:
  """Trials with equal keys can share data sets and eval splits.

  The workload's `dataset_builder`, `preprocess` and `synthetic_spec` are
  given the config and may read any key of it (the model's image size, a
  sequence length): every key but the optimizer's and the loop's, and the
  seed unless it shapes the data (`population.seed_shapes_data`).
  """
  flat = config_paths.flatten(records.config_to_dict(config))
  # Traced hyperparameters are read by the model and loss only (workload.py).
  left_out = set(_LOOP_ONLY_KEYS) | set(workload.traced_hyperparameters)
  if not population.seed_shapes_data(config, workload):
    left_out.add("seed")
  return json.dumps({k: v for k, v in flat.items()
                     if k not in left_out and not k.startswith("optimizer.")},
                    sort_keys=True, default=str)


@dataclasses.dataclass
class Data:
  """A data set's streams and eval splits, built once per `data_key`."""
  builder: Any  # The prepared TFDS builder, or None for synthetic data.
  stream: Any  # The training stream of `seed`.
  seed: int
  eval_splits: list[Any]
  # The training split on every device (transfers carry indices), or {}.
  examples: dict[str, jax.Array]
  in_memory: bool

  def stream_for(self, config, workload) -> Any:
    """The trial's stream: this one, or its examples in the trial's order."""
    if config.seed == self.seed:
      return self.stream
    if hasattr(self.stream, "with_seed"):
      return self.stream.with_seed(config.seed)
    return make_train_stream(config, workload, self.builder)  # Synthetic: small.


def build_data(config: ml_collections.ConfigDict, workload: workload_lib.Workload,
               mesh: jax.sharding.Mesh) -> Data:
  """Prepares the data set, the training stream of `config.seed` and the
  eval splits; places small in-memory training splits on the devices."""
  builder = (None if config.data.synthetic else
             input_pipeline.prepare_dataset(workload.dataset_builder, config))
  stream = make_train_stream(config, workload, builder)
  return Data(builder=builder, stream=stream, seed=config.seed,
              eval_splits=make_eval_splits(config, workload, builder),
              examples=device_examples.place(stream, mesh,
                                             config.data.on_device_max_mb),
              in_memory=in_memory_data(config, workload))


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
  """What the compiled programs of a set of trials depend on."""
  structure: str  # population.structure_key of every trial, given `traced`.
  num_trials: int
  shared_data: bool  # One batch for all trials (one seed), or one each.
  mode: str  # population.over_trials mode.
  # The traced hyperparameters that the programs take as values.
  traced: tuple[str, ...] = ()


@dataclasses.dataclass
class Programs:
  """The jitted programs of trials stacked along a leading axis."""
  abstract_trial: Any  # One trial's state: shapes, dtypes and shardings.
  init_trial: Callable  # (key_data, hyperparameters) -> one trial's state.
  stack: Callable  # (*trial states) -> the stacked state.
  take_trial: Callable  # (stacked state, index) -> one trial's state.
  # (state, batches, buffer, active, examples, hyperparameters).
  train_step: Callable
  step_fn: Callable  # One trial's step on one batch, unjitted: (state, batch).
  batch_sharding: Any
  # Evaluators of (state, traced hyperparameters): one trial's, and the
  # stacked trials' (N > 1).
  trial_evaluator: evaluation.Evaluator
  population_evaluator: evaluation.Evaluator | None


def build_programs(spec: ProgramSpec, config: ml_collections.ConfigDict,
                   workload: workload_lib.Workload, data: Data,
                   mesh: jax.sharding.Mesh) -> Programs:
  """Jits the programs of `spec` for trials of `config`'s structure.

  The train and eval steps take the values of `spec.traced` per trial
  (`_trial_steps`).
  """
  replicated = sharding.replicated(mesh)
  model = workload.create_model(config)
  tx = optimizers.create_optimizer(config.optimizer, config.max_train_steps)
  input_shape, input_dtype = data.stream.element_spec()
  sample = jnp.zeros((1,) + tuple(input_shape), input_dtype)
  ema = config.ema_decay > 0

  def init_one(key_data, opt_hyperparams):
    state = train_step_lib.create_train_state(model, tx, sample, key_data, ema=ema)
    return state.replace(opt_state=optimizers.with_hyperparameters(
        state.opt_state, opt_hyperparams))

  trial_loop, eval_step = _trial_steps(config, workload, model, tx)
  # Traces the model; compiles nothing. `config.model` was checked before:
  # an error here is in the workload's code and keeps its traceback.
  abstract_one = jax.eval_shape(
      init_one, train_step_lib.seed_key_data(0), trial_hyperparameters(config))
  # One trial's state over the mesh (replicated, or split over "fsdp"), and
  # the stacked trials' with a leading trial axis.
  trial_sharding = sharding.state_shardings(
      abstract_one, mesh, min_size=config.sharding.fsdp_min_size,
      rules=workload.sharding_rules)
  stacked_sharding = sharding.stacked_shardings(trial_sharding)
  hyperparams_sharding = {k: replicated for k in spec.traced}
  batch_sharding = (sharding.stacked_batch_sharding(mesh) if spec.shared_data
                    else sharding.per_trial_batch_sharding(mesh))
  trained = population.over_trials(
      trial_loop, (0, None if spec.shared_data else 0, 0, None, 0),
      spec.num_trials, spec.mode)

  def step_in_loop(state, batches, buffer, active, examples, hyperparams):
    new_state, new_buffer = trained(state, batches, buffer, examples, hyperparams)
    if spec.num_trials == 1:  # A trial alone stops the loop when it ends.
      return new_state, new_buffer
    return (population.keep_active(active, new_state, state),
            population.keep_active(active, new_buffer, buffer))

  trial_evaluator = evaluation.Evaluator(
      eval_step, data.eval_splits, mesh, (trial_sharding, hyperparams_sharding),
      on_device=data.in_memory)
  population_evaluator = None
  if spec.num_trials > 1:
    # vmap in every mode: unrolled, the eval step compiled 0.5 s longer
    # (4 trials) to save 4 ms per eval.
    population_evaluator = trial_evaluator.for_step(
        jax.vmap(eval_step, in_axes=(0, None)),
        (stacked_sharding, hyperparams_sharding))
  return Programs(
      abstract_trial=jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
          abstract_one, trial_sharding),
      init_trial=jax.jit(init_one, out_shardings=trial_sharding),
      stack=train_step_lib.jit_data_movement(population.stack,
                                             out_shardings=stacked_sharding),
      # One trial's state, to evaluate alone or to checkpoint: one program
      # for the whole tree (indexing leaf by leaf would compile one per shape).
      take_trial=train_step_lib.jit_data_movement(population.take,
                                                  out_shardings=trial_sharding),
      train_step=jax.jit(
          step_in_loop,  # The name profiles show (xprof/summarize_trace.py).
          in_shardings=(stacked_sharding, batch_sharding, replicated, replicated,
                        replicated, hyperparams_sharding),
          out_shardings=(stacked_sharding, replicated), donate_argnums=(0, 2)),
      step_fn=train_step_lib.make_train_step(
          model, tx, workload.loss_fn, config.grad_clip_norm, workload.weights_fn,
          ema_decay=config.ema_decay),
      batch_sharding=batch_sharding,
      trial_evaluator=trial_evaluator,
      population_evaluator=population_evaluator)


def _trial_steps(config: ml_collections.ConfigDict, workload: workload_lib.Workload,
                 model: Any, tx: Any) -> tuple[Callable, Callable]:
  """One trial's loop step `(state, batches, buffer, examples, hyperparams)`
  and eval step `((state, hyperparams), batch)`.

  `hyperparams` holds the values of the traced hyperparameters (a dict of
  float32 scalars): the steps build the model and loss of a config that
  holds them. Without any (`{}`), they use `model` and the workload's loss,
  built once from `config`.
  """

  def model_and_loss(hyperparams):
    if not hyperparams:
      return model, workload.loss_fn
    view = workload_lib.with_traced_values(config, hyperparams)
    bound = workload_lib.load_workload(config.workload, view)
    return bound.create_model(view), bound.loss_fn

  def trial_loop(state, batches, buffer, examples, hyperparams):
    trial_model, loss_fn = model_and_loss(hyperparams)
    step = train_step_lib.make_train_step(
        trial_model, tx, loss_fn, config.grad_clip_norm, workload.weights_fn,
        ema_decay=config.ema_decay)
    return train_step_lib.for_loop(step)(state, batches, buffer, examples)

  def eval_step(state_and_hyperparams, batch):
    state, hyperparams = state_and_hyperparams
    trial_model, loss_fn = model_and_loss(hyperparams)
    return train_step_lib.make_eval_step(
        trial_model, loss_fn, workload.correct_fn, workload.weights_fn)(state, batch)

  return trial_loop, eval_step


def trial_hyperparameters(config: ml_collections.ConfigDict) -> dict[str, np.float32]:
  """The continuous optimizer hyperparameters a trial's state carries."""
  values = optimizers.hyperparameter_values(config.optimizer, config.max_train_steps)
  return {k: np.float32(values[k]) for k in optimizers.HYPERPARAMETERS}


@dataclasses.dataclass
class SetupCache:
  """What a long-lived worker reuses from one population to the next."""
  data: dict[str, Data] = dataclasses.field(default_factory=dict)
  programs: dict[ProgramSpec, Programs] = dataclasses.field(default_factory=dict)

  def data_for(self, config, workload, mesh) -> Data:
    key = data_key(config, workload)
    if key not in self.data:
      self.data[key] = build_data(config, workload, mesh)
    return self.data[key]

  def programs_for(self, spec: ProgramSpec, config, workload, data: Data,
                   mesh) -> Programs:
    if spec not in self.programs:
      self.programs[spec] = build_programs(spec, config, workload, data, mesh)
    return self.programs[spec]
