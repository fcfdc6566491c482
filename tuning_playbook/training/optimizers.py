"""Optimizers with the playbook's update rules, as optax transformations.

The six rules (sgd, momentum, nesterov, rmsprop, adam, nadam) follow the FAQ
"What are the update rules for all the popular optimization algorithms?"
equation for equation: RMSProp starts with v_0 = 1, adds epsilon inside the
square root and accumulates the learning rate in m; ADAM and NADAM add epsilon
to sqrt(v) and multiply the whole step by
b_{t+1} = sqrt(1 - beta2^{t+1}) / (1 - beta1^{t+1}).

Every continuous hyperparameter lives in the optimizer state as a float32
array, so one compiled train step serves every trial of a study, and trials
can be batched with `jax.vmap` over those arrays. Only the optimizer name, the
schedule name and the weight decay type are static.

  tx = optimizers.create_optimizer(config.optimizer, config.max_train_steps)
  opt_state = tx.init(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  optimizers.current_learning_rate(opt_state)  # Used by the next update.
  opt_state = optimizers.with_hyperparameters(opt_state, {"learning_rate": 0.3})
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from tuning_playbook import config_schema

HYPERPARAMETERS = ("learning_rate", "momentum", "rho", "beta1", "beta2",
                   "epsilon", "weight_decay", "warmup_steps", "hold_steps",
                   "decay_steps", "end_learning_rate_factor")


@flax.struct.dataclass
class OptimizerState:
  """State of the transformation built by `create_optimizer`.

  Attributes:
    count: int32 scalar, the number of updates applied so far.
    hyperparams: float32 array per name in `HYPERPARAMETERS`; `decay_steps` is
      resolved (never 0 for "use the rest of training").
    moments: the rule's accumulators, each a pytree shaped like the params:
      {} (sgd), {"v"} (momentum, nesterov), {"v", "m"} (rmsprop),
      {"m", "v"} (adam, nadam).
    schedule: static name of the learning rate schedule (pytree metadata).
  """
  count: jax.Array
  hyperparams: dict[str, jax.Array]
  moments: dict[str, Any]
  schedule: str = flax.struct.field(pytree_node=False)


def resolved_decay_steps(optimizer_config: ml_collections.ConfigDict,
                         max_train_steps: int) -> int:
  """`decay_steps`, with 0 meaning the steps the schedule has left.

  A prepended warmup leaves all of `max_train_steps` to the hold and the
  decay; an included one takes its steps out of them.
  """
  if optimizer_config.decay_steps:
    return optimizer_config.decay_steps
  left = max_train_steps - optimizer_config.hold_steps
  if optimizer_config.warmup_mode == "included":
    left -= optimizer_config.warmup_steps
  return left


def learning_rate_at(step, *, schedule: str, learning_rate, warmup_steps,
                     decay_steps, end_learning_rate_factor,
                     hold_steps=0) -> jax.Array:
  """The scheduled learning rate at `step` (pure jnp; arguments may be arrays).

  Linear warmup from 0 reaches `learning_rate` at `step == warmup_steps`,
  which holds for `hold_steps` steps; "linear" and "cosine" then decay to
  `end_learning_rate_factor * learning_rate` over `decay_steps` steps and
  stay there.

  Args:
    step: number of updates applied before this one.
    schedule: "constant", "linear" or "cosine" (static).
    learning_rate: the peak learning rate.
    warmup_steps: length of the warmup; 0 for none.
    decay_steps: length of the decay after the hold (already resolved).
    end_learning_rate_factor: final learning rate as a fraction of the peak.
    hold_steps: steps at the peak between warmup and decay; 0 for none.
  """
  f32 = jnp.float32
  step = jnp.asarray(step, f32)
  warmup = jnp.asarray(warmup_steps, f32)
  decay = jnp.asarray(decay_steps, f32)
  end = jnp.asarray(end_learning_rate_factor, f32)
  decay_start = warmup + jnp.asarray(hold_steps, f32)
  warmup_factor = jnp.where(
      step < warmup, step / jnp.where(warmup > 0, warmup, 1.0), 1.0)
  progress = jnp.clip(
      (step - decay_start) / jnp.where(decay > 0, decay, 1.0), 0.0, 1.0)
  if schedule == "constant":
    decay_factor = jnp.ones_like(progress)
  elif schedule == "linear":
    decay_factor = 1.0 - (1.0 - end) * progress
  elif schedule == "cosine":
    decay_factor = end + (1.0 - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  else:
    _fail("optimizer.schedule", schedule, config_schema.SCHEDULES)
  return jnp.asarray(learning_rate, f32) * warmup_factor * decay_factor


def _one_minus_power(beta: jax.Array, t: jax.Array) -> jax.Array:
  # 1 - beta**t without the cancellation of computing beta**t first.
  return -jnp.expm1(t * jnp.log(beta))


def _sgd(g, moments, hp, lr, count):
  del hp, count
  return jax.tree.map(lambda g: -lr * g, g), moments


def _momentum(g, moments, hp, lr, count):
  del count
  v = jax.tree.map(lambda v, g: hp["momentum"] * v + g, moments["v"], g)
  return jax.tree.map(lambda v: -lr * v, v), {"v": v}


def _nesterov(g, moments, hp, lr, count):
  del count
  gamma = hp["momentum"]
  v = jax.tree.map(lambda v, g: gamma * v + g, moments["v"], g)
  updates = jax.tree.map(lambda v, g: -lr * (gamma * v + g), v, g)
  return updates, {"v": v}


def _rmsprop(g, moments, hp, lr, count):
  del count
  rho, gamma, eps = hp["rho"], hp["momentum"], hp["epsilon"]
  v = jax.tree.map(lambda v, g: rho * v + (1 - rho) * g * g, moments["v"], g)
  m = jax.tree.map(lambda m, v, g: gamma * m + lr / jnp.sqrt(v + eps) * g,
                   moments["m"], v, g)
  return jax.tree.map(jnp.negative, m), {"v": v, "m": m}


def _adam_moments(g, moments, hp, count):
  b1, b2 = hp["beta1"], hp["beta2"]
  m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, moments["m"], g)
  v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, moments["v"], g)
  t = (count + 1).astype(jnp.float32)
  b = jnp.sqrt(_one_minus_power(b2, t)) / _one_minus_power(b1, t)
  return m, v, b


def _adam(g, moments, hp, lr, count):
  m, v, b = _adam_moments(g, moments, hp, count)
  eps = hp["epsilon"]
  updates = jax.tree.map(lambda m, v: -lr * m / (jnp.sqrt(v) + eps) * b, m, v)
  return updates, {"m": m, "v": v}


def _nadam(g, moments, hp, lr, count):
  m, v, b = _adam_moments(g, moments, hp, count)
  b1, eps = hp["beta1"], hp["epsilon"]
  updates = jax.tree.map(
      lambda m, v, g: -lr * (b1 * m + (1 - b1) * g) / (jnp.sqrt(v) + eps) * b,
      m, v, g)
  return updates, {"m": m, "v": v}


# name -> (initial value of each accumulator, update rule).
_RULES: dict[str, tuple[dict[str, float], Callable]] = {
    "sgd": ({}, _sgd),
    "momentum": ({"v": 0.0}, _momentum),
    "nesterov": ({"v": 0.0}, _nesterov),
    "rmsprop": ({"v": 1.0, "m": 0.0}, _rmsprop),
    "adam": ({"m": 0.0, "v": 0.0}, _adam),
    "nadam": ({"m": 0.0, "v": 0.0}, _nadam),
}


def _fail(key: str, value, allowed) -> None:
  raise config_schema.ConfigError(
      f"config.{key}={value!r} is invalid: allowed: {', '.join(allowed)}")


def hyperparameter_values(optimizer_config: ml_collections.ConfigDict,
                          max_train_steps: int) -> dict[str, float]:
  """The values `init` puts in the state, by the names in `HYPERPARAMETERS`."""
  values = {k: float(optimizer_config[k]) for k in HYPERPARAMETERS}
  values["decay_steps"] = float(
      resolved_decay_steps(optimizer_config, max_train_steps))
  return values


def create_optimizer(optimizer_config: ml_collections.ConfigDict,
                     max_train_steps: int) -> optax.GradientTransformation:
  """The optimizer that `config.optimizer` names, with its schedule built in.

  `update` needs `params` (for weight decay). "decoupled" weight decay adds
  `-lr_t * weight_decay * params` to the rule's update; "l2" adds
  `weight_decay * params` to the gradient before the rule sees it.

  Args:
    optimizer_config: the `config.optimizer` section (already validated).
    max_train_steps: resolves `decay_steps == 0` (see resolved_decay_steps).

  Raises:
    ConfigError (a ValueError) naming the key for an unknown optimizer,
    schedule or weight decay type.
  """
  name = optimizer_config.name
  schedule = optimizer_config.schedule
  weight_decay_type = optimizer_config.weight_decay_type
  if name not in _RULES:
    _fail("optimizer.name", name, config_schema.OPTIMIZERS)
  if schedule not in config_schema.SCHEDULES:
    _fail("optimizer.schedule", schedule, config_schema.SCHEDULES)
  if weight_decay_type not in config_schema.WEIGHT_DECAY_TYPES:
    _fail("optimizer.weight_decay_type", weight_decay_type,
          config_schema.WEIGHT_DECAY_TYPES)
  initial_moments, rule = _RULES[name]
  values = hyperparameter_values(optimizer_config, max_train_steps)

  def init_fn(params):
    moments = {
        k: jax.tree.map(lambda p, fill=fill: jnp.full_like(p, fill), params)
        for k, fill in initial_moments.items()}
    return OptimizerState(
        count=jnp.zeros([], jnp.int32),
        hyperparams={k: jnp.asarray(v, jnp.float32) for k, v in values.items()},
        moments=moments,
        schedule=schedule)

  def update_fn(grads, state, params=None):
    if params is None:
      raise ValueError("this optimizer's update needs params (weight decay)")
    hp = state.hyperparams
    lr = _learning_rate(state)
    wd = hp["weight_decay"]
    if weight_decay_type == "l2":
      grads = jax.tree.map(lambda g, p: g + wd * p, grads, params)
    updates, moments = rule(grads, state.moments, hp, lr, state.count)
    if weight_decay_type == "decoupled":
      updates = jax.tree.map(lambda u, p: u - lr * wd * p, updates, params)
    # The state keeps its dtypes from step to step (no retracing).
    moments = jax.tree.map(lambda new, old: new.astype(old.dtype),
                           moments, state.moments)
    updates = jax.tree.map(lambda u, g: u.astype(g.dtype), updates, grads)
    return updates, state.replace(count=state.count + 1, moments=moments)

  return optax.GradientTransformation(init_fn, update_fn)


def _learning_rate(state: OptimizerState) -> jax.Array:
  hp = state.hyperparams
  return learning_rate_at(
      state.count, schedule=state.schedule, learning_rate=hp["learning_rate"],
      warmup_steps=hp["warmup_steps"], decay_steps=hp["decay_steps"],
      end_learning_rate_factor=hp["end_learning_rate_factor"],
      hold_steps=hp["hold_steps"])


def _find(opt_state) -> OptimizerState:
  """The `OptimizerState` in `opt_state`, also inside optax.chain's tuples."""
  if isinstance(opt_state, OptimizerState):
    return opt_state
  children = (opt_state.values() if isinstance(opt_state, Mapping) else
              opt_state if isinstance(opt_state, (tuple, list)) else ())
  for child in children:
    try:
      return _find(child)
    except ValueError:
      pass
  raise ValueError("opt_state holds no tuning_playbook.training.optimizers state")


def _replace(opt_state, fn: Callable[[OptimizerState], OptimizerState]):
  """`opt_state` with its `OptimizerState` (wherever it is) replaced by fn's."""
  if isinstance(opt_state, OptimizerState):
    return fn(opt_state)
  if isinstance(opt_state, Mapping):
    return type(opt_state)({k: _replace(v, fn) for k, v in opt_state.items()})
  if hasattr(opt_state, "_fields"):  # NamedTuple.
    return type(opt_state)(*(_replace(v, fn) for v in opt_state))
  if isinstance(opt_state, (tuple, list)):
    return type(opt_state)(_replace(v, fn) for v in opt_state)
  return opt_state


def current_learning_rate(opt_state) -> jax.Array:
  """The learning rate that the next update will use."""
  return _learning_rate(_find(opt_state))


def step_count(opt_state) -> jax.Array:
  """The number of updates applied so far (int32)."""
  return _find(opt_state).count


def hyperparameters(opt_state) -> dict[str, jax.Array]:
  """The hyperparameter arrays, by the names in `HYPERPARAMETERS`."""
  return dict(_find(opt_state).hyperparams)


def _as_float32_like(value, old) -> jax.Array:
  new = jnp.asarray(value, jnp.float32)
  if (not isinstance(new, jax.core.Tracer)
      and not isinstance(old, jax.core.Tracer) and new.shape == old.shape
      and getattr(old, "committed", False)):
    # Same placement as before, so a jitted step sees the same input sharding.
    new = jax.device_put(new, old.sharding)
  return new


def with_hyperparameters(opt_state, values: Mapping[str, Any]):
  """`opt_state` with some hyperparameters replaced; nothing is recompiled.

  Values keep the old shape to reuse a compiled step (scalars, or one value
  per trial when trials are batched with `jax.vmap`). `decay_steps` is taken
  as given (no 0 = "rest of training" here).
  """
  unknown = sorted(set(values) - set(HYPERPARAMETERS))
  if unknown:
    raise ValueError(f"unknown optimizer hyperparameters {unknown}; known: "
                     f"{', '.join(HYPERPARAMETERS)}")

  def replace(state: OptimizerState) -> OptimizerState:
    hp = dict(state.hyperparams)
    for k, v in values.items():
      hp[k] = _as_float32_like(v, hp[k])
    return state.replace(hyperparams=hp)

  return _replace(opt_state, replace)
