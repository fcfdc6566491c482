"""The checks of a training config, run before anything is compiled.

  config_validation.validate(config, num_devices=jax.device_count())

Each raises `config_schema.ConfigError` naming the key, the bad value and
what is allowed; the keys and their defaults are `config_schema`'s.
"""

from __future__ import annotations

import math

import ml_collections

from tuning_playbook import config_schema


def _check_keys(config: ml_collections.ConfigDict,
                reference: ml_collections.ConfigDict, prefix: str = ""):
  for key in config.keys():
    full = f"{prefix}{key}"
    if key == "model" and not prefix:
      continue
    if key not in reference:
      config_schema.fail(full, config[key], "unknown key; allowed keys here: "
            + ", ".join(sorted(f"{prefix}{k}" for k in reference.keys())))
    if isinstance(reference[key], ml_collections.ConfigDict):
      if not isinstance(config[key], ml_collections.ConfigDict):
        config_schema.fail(full, config[key], "must be a section (ConfigDict)")
      _check_keys(config[key], reference[key], prefix=f"{full}.")
  for key in reference.keys():
    if key not in config:
      raise config_schema.ConfigError(f"config.{prefix}{key} is missing; start configs from "
                        "tuning_playbook.config_schema.base_config()")


def validate(config: ml_collections.ConfigDict,
             num_devices: int | None = None) -> None:
  """Raises ConfigError for the first bad key; touches no JAX device.

  `num_devices` (None: unknown yet) adds the checks that depend on it.
  """
  _check_keys(config, config_schema.base_config())
  if not config.workload:
    config_schema.fail("workload", config.workload, "name a module in workloads/")
  num_devices = _validate_sizes(config, num_devices)
  _validate_selection(config)
  _validate_limits(config)
  config_schema.profile_step_range(config)
  _validate_optimizer(config)
  _validate_batch_norm(config, num_devices)
  _validate_data(config)


def _validate_sizes(config: ml_collections.ConfigDict,
                    num_devices: int | None) -> int:
  """Steps, batch sizes and the mesh; returns the device count checked."""
  for key in ("batch_size", "max_train_steps", "eval_every_steps",
              "log_every_steps"):
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      config_schema.fail(key, value, "must be a positive integer")
  min_size = config.sharding.fsdp_min_size
  if not isinstance(min_size, int) or min_size < 0:
    config_schema.fail("sharding.fsdp_min_size", min_size,
                       "must be an integer >= 0 (elements)")
  if num_devices is None:
    config_schema.check_mesh_values(config)
    num_devices = 1
  else:
    config_schema.mesh_axis_sizes(config, num_devices)
  if config.batch_size % num_devices:
    config_schema.fail("batch_size", config.batch_size,
                       "the global batch must be divisible by the device "
                       f"count ({num_devices})")
  eval_bs = config_schema.resolved_eval_batch_size(config)
  if eval_bs < config.batch_size:
    config_schema.fail("eval_batch_size", config.eval_batch_size,
                       f"must be 0 or at least batch_size ({config.batch_size})")
  if eval_bs % num_devices:
    config_schema.fail("eval_batch_size", eval_bs,
                       f"must be divisible by the device count ({num_devices})")
  return num_devices


def _validate_selection(config: ml_collections.ConfigDict) -> None:
  """The seed, checkpoint selection and the averaged parameters."""
  if not isinstance(config.seed, int) or config.seed < 0:
    config_schema.fail("seed", config.seed, "must be a non-negative integer")
  if config.num_best_checkpoints < 1:
    config_schema.fail("num_best_checkpoints", config.num_best_checkpoints,
                       "must be >= 1")
  if config.best_mode not in config_schema.BEST_MODES:
    config_schema.fail("best_mode", config.best_mode,
                       f"allowed: {', '.join(config_schema.BEST_MODES)}")
  ema = config.ema_decay
  if (not isinstance(ema, (int, float)) or isinstance(ema, bool)
      or not 0 <= ema < 1):
    config_schema.fail("ema_decay", ema,
                       "must be in [0, 1) (0: no parameter averaging)")
  parts = config.best_metric.split("/")
  if (len(parts) != 3 or parts[0] not in config_schema.EVAL_PREFIXES
      or parts[1] not in config_schema.EVAL_SPLITS
      or parts[2] not in config_schema.EVAL_METRICS):
    config_schema.fail(
        "best_metric", config.best_metric,
        "must be eval/<split>/<metric> (or eval_ema/<split>/<metric>, the "
        "averaged parameters', with ema_decay > 0) with split in "
        f"{', '.join(config_schema.EVAL_SPLITS)} and metric in "
        f"{', '.join(config_schema.EVAL_METRICS)}")
  if parts[0] == "eval_ema" and ema == 0:
    config_schema.fail(
        "best_metric", config.best_metric,
        f"eval_ema/... metrics need config.ema_decay > 0 (it is {ema!r}): "
        "set ema_decay, or pick an eval/... metric")


def _validate_limits(config: ml_collections.ConfigDict) -> None:
  """Thresholds, deadlines, the compute dtype and the input-bound warning."""
  checks = (
      ("train_eval_subset_size", config.train_eval_subset_size >= 0,
       "must be >= 0"),
      ("grad_clip_norm", config.grad_clip_norm >= 0, "must be >= 0 (0 disables)"),
      ("divergence_loss_threshold", config.divergence_loss_threshold > 0,
       "must be > 0"),
      ("watchdog_floor_seconds", config.watchdog_floor_seconds > 0,
       "must be > 0"),
      ("preemption_deadline_seconds", config.preemption_deadline_seconds > 0,
       "must be > 0"),
  )
  for key, ok, allowed in checks:
    if not ok:
      config_schema.fail(key, config[key], allowed)
  if config.compute_dtype not in config_schema.COMPUTE_DTYPES:
    config_schema.fail("compute_dtype", config.compute_dtype,
                       f"allowed: {', '.join(config_schema.COMPUTE_DTYPES)}")
  if not 0 < config.input_bound_warning_fraction <= 1:
    config_schema.fail("input_bound_warning_fraction",
                       config.input_bound_warning_fraction,
                       "must be in (0, 1] (1: never warn)")


def _validate_data(config: ml_collections.ConfigDict) -> None:
  data = config.data
  checks = (
      ("batches_per_transfer", data.batches_per_transfer >= 1, "must be >= 1"),
      ("on_device_max_mb", data.on_device_max_mb >= 0,
       "must be >= 0 (0: gather batches on the host)"),
      ("prefetch_batches", data.prefetch_batches >= 1, "must be >= 1"),
      ("shuffle_buffer", data.shuffle_buffer >= 1, "must be >= 1"),
      ("max_length", data.max_length >= 0,
       "must be >= 0 (0: not a sequence workload)"),
  )
  for key, ok, allowed in checks:
    if not ok:
      config_schema.fail(f"data.{key}", data[key], allowed)


def _validate_optimizer(config):
  opt = config.optimizer
  if opt.name not in config_schema.OPTIMIZERS:
    config_schema.fail("optimizer.name", opt.name, f"allowed: {', '.join(config_schema.OPTIMIZERS)}")
  if opt.schedule not in config_schema.SCHEDULES:
    config_schema.fail("optimizer.schedule", opt.schedule, f"allowed: {', '.join(config_schema.SCHEDULES)}")
  if opt.weight_decay_type not in config_schema.WEIGHT_DECAY_TYPES:
    config_schema.fail("optimizer.weight_decay_type", opt.weight_decay_type,
          f"allowed: {', '.join(config_schema.WEIGHT_DECAY_TYPES)}")
  lr = opt.learning_rate
  if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
    config_schema.fail("optimizer.learning_rate", lr, "must be a finite number >= 0")
  for key in ("momentum", "rho", "beta1", "beta2"):
    if not 0 <= opt[key] < 1:
      config_schema.fail(f"optimizer.{key}", opt[key], "must be in [0, 1)")
  if not opt.epsilon >= 0:
    config_schema.fail("optimizer.epsilon", opt.epsilon, "must be >= 0")
  if not opt.weight_decay >= 0:
    config_schema.fail("optimizer.weight_decay", opt.weight_decay, "must be >= 0")
  _validate_schedule_phases(config)
  if not 0 <= opt.end_learning_rate_factor <= 1:
    config_schema.fail("optimizer.end_learning_rate_factor", opt.end_learning_rate_factor,
          "must be in [0, 1]")


def _check_steps(key: str, value, upper: int, where: str) -> None:
  if (not isinstance(value, int) or isinstance(value, bool)
      or not 0 <= value <= upper):
    config_schema.fail(key, value, f"must be an integer in [0, {upper}] ({where})")


def _validate_schedule_phases(config):
  """Warmup, hold and decay must fit in the steps the schedule spans."""
  opt = config.optimizer
  max_steps = config.max_train_steps
  if opt.warmup_mode not in config_schema.WARMUP_MODES:
    config_schema.fail("optimizer.warmup_mode", opt.warmup_mode,
          f"allowed: {', '.join(config_schema.WARMUP_MODES)}")
  if opt.warmup_mode == "prepended":
    _check_steps("optimizer.warmup_steps", opt.warmup_steps, max_steps,
                 f"prepended to max_train_steps={max_steps}, and no longer")
    span, span_name = max_steps, f"max_train_steps={max_steps}"
  else:
    _check_steps("optimizer.warmup_steps", opt.warmup_steps, max_steps,
                 f"counted within max_train_steps={max_steps}")
    span = max_steps - opt.warmup_steps
    span_name = (f"max_train_steps={max_steps} - "
                 f"optimizer.warmup_steps={opt.warmup_steps}")
  _check_steps("optimizer.hold_steps", opt.hold_steps, span,
               f"the hold fits in {span_name}")
  _check_steps("optimizer.decay_steps", opt.decay_steps, span - opt.hold_steps,
               f"0 means the rest; the hold plus the decay fit in {span_name}")


def _validate_batch_norm(config, num_devices):
  bn = config.batch_norm
  if bn.policy not in config_schema.BATCH_NORM_POLICIES:
    config_schema.fail("batch_norm.policy", bn.policy,
          f"allowed: {', '.join(config_schema.BATCH_NORM_POLICIES)}")
  if not 0 <= bn.momentum < 1:
    config_schema.fail("batch_norm.momentum", bn.momentum, "must be in [0, 1)")
  if bn.policy == "ghost":
    vbs = bn.virtual_batch_size
    if vbs <= 0 or config.batch_size % vbs:
      config_schema.fail("batch_norm.virtual_batch_size", vbs,
            f"ghost BatchNorm needs a positive size that divides batch_size "
            f"({config.batch_size}) into groups")
