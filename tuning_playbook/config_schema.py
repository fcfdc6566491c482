"""The keys every training config has, their defaults, and their checks.

Workload configs start from `base_config()` and override fields:

  from tuning_playbook import config_schema

  def get_config():
    config = config_schema.base_config()
    config.workload = "mnist1d_cnn"
    config.model = ml_collections.ConfigDict({"features": 32})
    return config

`config_validation.validate(config)` runs before anything is compiled and
raises `ConfigError` naming the key, the bad value and what is allowed. The `model` section is
free-form: the workload's model checks its own fields.
"""

from __future__ import annotations

import json
import math
from typing import Any

import ml_collections

from tuning_playbook import config_paths

# The axes of the device mesh (config.sharding.mesh), outermost first.
MESH_AXES = ("data", "fsdp")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "rmsprop", "adam", "nadam")
SCHEDULES = ("constant", "linear", "cosine")
WARMUP_MODES = ("prepended", "included")
BEST_MODES = ("min", "max")
WEIGHT_DECAY_TYPES = ("decoupled", "l2")
EVAL_SPLITS = ("validation", "train", "test")
EVAL_METRICS = ("loss", "error_rate", "accuracy", "num_correct", "num_examples")
# Metrics of the raw parameters, and of their moving average (ema_decay > 0).
EVAL_PREFIXES = ("eval", "eval_ema")
BATCH_NORM_POLICIES = ("global", "ghost", "per_device")
COMPUTE_DTYPES = ("float32", "bfloat16", "auto")


class ConfigError(ValueError):
  """A config key holds a value that training cannot use."""


def base_config() -> ml_collections.ConfigDict:
  """Returns the config every workload config extends."""
  c = ml_collections.ConfigDict()
  c.workload = ""
  c.seed = 0
  c.batch_size = 128  # Global, over all hosts and devices.
  c.eval_batch_size = 0  # Global; 0 means max(batch_size, 1024).
  c.max_train_steps = 1000
  c.eval_every_steps = 100
  c.log_every_steps = 50
  c.num_best_checkpoints = 3
  c.best_metric = "eval/validation/error_rate"
  c.best_mode = "min"
  # Size of the fixed subset of the training split evaluated as "train";
  # 0 means the size of the validation split.
  c.train_eval_subset_size = 0
  c.grad_clip_norm = 0.0  # 0 disables clipping by global norm.
  # Polyak averaging: > 0 keeps an exponential moving average of the
  # parameters (decay min(ema_decay, (1 + t) / (10 + t)) after update t),
  # evaluated beside the raw ones as eval_ema/<split>/<metric> and saved in
  # every checkpoint. 0 is off.
  c.ema_decay = 0.0
  # A training loss above this (or NaN/Inf) marks the trial as diverged.
  c.divergence_loss_threshold = 1e6
  # Watchdog: a train step, log fetch, eval or checkpoint that takes too long
  # (a hung or dead peer) dumps every stack and exits with status 42.
  # < 0: automatic, max(watchdog_floor_seconds, 10 x the longest of its kind
  # so far; the first of a kind, which compiles, may take 10 x the floor);
  # > 0: this many seconds for each; 0: off.
  c.step_watchdog_seconds = -1.0
  c.watchdog_floor_seconds = 300.0
  # On SIGTERM (a preemption, a scheduler's time limit) training stops at the
  # next step boundary (the same step in every process), checkpoints, flushes
  # its records and exits with status 143; a process still alive this many
  # seconds after the signal exits at once.
  c.preemption_deadline_seconds = 60.0
  # The dtype of the model's computation (activations, matmuls, convolutions),
  # for the workloads that honour it (`workload.compute_dtype(config)`).
  # Parameters, optimizer state, gradients, logits given to the loss, loss
  # reductions and normalization statistics (the framework's BatchNorm,
  # Flax's LayerNorm) stay float32 whatever it is. "auto": bfloat16 on TPUs
  # and GPUs, float32 on CPUs (whose bfloat16 arithmetic is emulated, slower
  # than float32).
  c.compute_dtype = "float32"  # float32 | bfloat16 | auto
  # True: `tuning_playbook.main` exits with status 2, before compiling or
  # writing anything, when JAX finds no GPU or TPU (only the CPU), as its
  # `--require_accelerator` flag does.
  c.require_accelerator = False
  # Warn (log, summary.json, study report) when the loop waits for its next
  # batch more than this fraction of a log interval's wall time.
  c.input_bound_warning_fraction = 0.2
  # "START:END": trace steps START..END (both included) into <workdir>/profile
  # (tuning_playbook/training/profiling.py); "" is off. Process 0 only, unless
  # profile_all_processes.
  c.profile_steps = ""
  c.profile_all_processes = False

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "nesterov"
  c.optimizer.learning_rate = 0.1  # Peak (post-warmup) learning rate.
  c.optimizer.momentum = 0.9  # momentum, nesterov, rmsprop (gamma).
  c.optimizer.rho = 0.9  # rmsprop.
  c.optimizer.beta1 = 0.9  # adam, nadam.
  c.optimizer.beta2 = 0.999  # adam, nadam.
  c.optimizer.epsilon = 1e-8  # rmsprop, adam, nadam.
  c.optimizer.weight_decay = 0.0
  c.optimizer.weight_decay_type = "decoupled"
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 0  # Linear warmup from 0.
  # "prepended": warmup runs before the schedule, which keeps all of
  # max_train_steps (total_train_steps = warmup_steps + max_train_steps);
  # "included": warmup counts within max_train_steps.
  c.optimizer.warmup_mode = "prepended"
  # Steps at the peak learning rate after warmup, before the decay.
  c.optimizer.hold_steps = 0
  # Steps of decay after the hold; 0 means the steps left: max_train_steps -
  # hold_steps ("prepended"), or that less warmup_steps ("included").
  c.optimizer.decay_steps = 0
  # Learning rate at the end of the decay, as a fraction of the peak.
  c.optimizer.end_learning_rate_factor = 0.0

  c.batch_norm = ml_collections.ConfigDict()
  c.batch_norm.policy = "global"  # global | ghost | per_device
  c.batch_norm.virtual_batch_size = 0  # Used by "ghost".
  c.batch_norm.momentum = 0.9

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = ""  # "" means the TFDS default.
  c.data.shuffle_buffer = 50_000
  # Tokens per example of a sequence workload (inputs and labels are cut or
  # padded to it); 0 for workloads without sequences.
  c.data.max_length = 0
  # Keep data in memory: tf.data's cache, or, for workloads without a custom
  # `preprocess`, the whole training split as arrays (no tf.data per step).
  c.data.cache = True
  c.data.prefetch_batches = 2  # Transfers kept in flight to the devices.
  # Batches sent to the devices in one transfer (a [k, batch, ...] array); the
  # train step picks its batch from it on the device. Larger k means fewer
  # transfers and less host work per step, and k batches of device memory.
  c.data.batches_per_transfer = 1
  # An in-memory training split of up to this many MiB is held on every
  # device: transfers carry example indices and the step gathers its batch
  # there (no host gather per batch). 0: always gather on the host.
  c.data.on_device_max_mb = 512
  # Random batches of the workload's shapes instead of its data set (which is
  # then neither downloaded nor read): measures throughput without data. Needs
  # the workload's `synthetic_spec`; metrics are those of random labels.
  c.data.synthetic = False
  # The train-time augmentation of the workload's `preprocess` (random crops
  # and flips, say); False trains on the examples as evaluated. Workloads
  # without augmentation ignore it.
  c.data.augment = True

  c.sharding = ml_collections.ConfigDict()
  # The device mesh: axis name -> size, in the order of MESH_AXES; -1 (one
  # axis at most) takes the devices left. The batch is split over every axis;
  # parameters, gradients, optimizer state and EMA over "fsdp" (each array
  # along its largest dimension divisible by the axis size, unless the
  # workload's SHARDING_RULES say otherwise; see tuning_playbook/training/sharding.py).
  # {"data": -1, "fsdp": 1} is plain data parallelism. A run may resume on
  # another mesh: checkpoints restore onto any shape.
  c.sharding.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
  # Arrays with fewer elements than this stay replicated when fsdp > 1: the
  # memory they would save is not worth a collective each.
  c.sharding.fsdp_min_size = 2**14

  c.model = ml_collections.ConfigDict()
  return c


def mesh_axis_sizes(config: ml_collections.ConfigDict,
                    num_devices: int) -> dict[str, int]:
  """`config.sharding.mesh` with -1 resolved: {axis: size} in MESH_AXES
  order, whose product is `num_devices`; ConfigError otherwise."""
  check_mesh_values(config)
  sizes = {axis: config.sharding.mesh[axis] for axis in MESH_AXES}
  free = [a for a, v in sizes.items() if v == -1]
  if len(free) > 1:
    fail(f"sharding.mesh.{free[1]}", -1, f"only one axis may be -1 (here also "
          f"sharding.mesh.{free[0]})")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  described = ", ".join(f"{a}={v}" for a, v in sizes.items())
  if free:
    if num_devices % fixed:
      fail(f"sharding.mesh.{free[0]}", -1, f"the other axes ({described}) "
            f"must divide the {num_devices} devices")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    fail("sharding.mesh", described, f"the axes' sizes must multiply to the "
          f"{num_devices} devices (or set one axis to -1)")
  return sizes


def added_at_default(key: str, value: Any) -> bool:
  """Whether a record written before the dotted `key` existed agrees with
  `value`: true when `key` is a base-config key at its default (keys come
  with the default that keeps the behaviour from before them)."""
  defaults = config_paths.flatten(base_config())
  return key in defaults and _as_json(defaults[key]) == _as_json(value)


def _as_json(value: Any) -> Any:
  return json.loads(json.dumps(value, default=str))


def fail(key: str, value: Any, allowed: str) -> None:
  """Raises ConfigError naming `config.<key>`, its value and what is allowed."""
  raise ConfigError(f"config.{key}={value!r} is invalid: {allowed}")


def total_train_steps(config: ml_collections.ConfigDict) -> int:
  """The steps the run trains: max_train_steps plus a prepended warmup."""
  if config.optimizer.warmup_mode == "prepended":
    return config.max_train_steps + config.optimizer.warmup_steps
  return config.max_train_steps


def resolved_eval_batch_size(config: ml_collections.ConfigDict) -> int:
  return config.eval_batch_size or max(config.batch_size, 1024)


def check_mesh_values(config: ml_collections.ConfigDict) -> None:
  """The mesh checks that need no device count."""
  for axis in MESH_AXES:
    value = config.sharding.mesh[axis]
    if not isinstance(value, int) or isinstance(value, bool) or (
        value < 1 and value != -1):
      fail(f"sharding.mesh.{axis}", value, "must be a positive integer, or -1 "
            "for the devices the other axes leave")


def profile_step_range(config: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """(START, END) of `config.profile_steps` = "START:END"; None when off."""
  value = config.profile_steps
  if not value:
    return None
  parts = value.split(":") if isinstance(value, str) else []
  if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
    fail("profile_steps", value, "must be \"START:END\" (two step numbers) or "
          "\"\" (off)")
  start, end = int(parts[0]), int(parts[1])
  total = total_train_steps(config)
  if not 1 <= start <= end <= total:
    fail("profile_steps", value, "needs 1 <= START <= END <= "
          f"total_train_steps={total} (max_train_steps="
          f"{config.max_train_steps} + a prepended warmup)")
  return start, end
