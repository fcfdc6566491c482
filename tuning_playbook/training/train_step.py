"""Train state, and the pure train and eval steps compiled once per run.

The steps are pure functions of arrays: the learning rate and every other
continuous optimizer hyperparameter live in `state.opt_state`, the RNG in
`state.rng` (raw key data, so checkpoints stay portable), and the dropout key
of step t is `fold_in(key(state.rng), t)`.

With `ema_decay > 0` the state also carries `ema_params`, an exponential
moving average (Polyak averaging) of the parameters in float32, updated in the
train step after the optimizer's update t (t = 1, 2, ...):

  ema_t = d_t * ema_{t-1} + (1 - d_t) * params_t,
  d_t = min(ema_decay, (1 + t) / (10 + t)),  ema_0 = params_0.

The warmup of d_t keeps the first steps' average from being dominated by the
initial parameters. Evaluating `ema_state(state)` uses the averaged
parameters with the raw model's BatchNorm statistics (see `ema_state`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tuning_playbook.training import device_examples
from tuning_playbook.training import optimizers

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# Per-step training metrics, in the column order of the metrics buffer.
STEP_METRICS = ("train/loss", "train/grad_norm", "train/clipped",
                "train/learning_rate")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: the number of updates applied.
  params: Any
  batch_stats: Any  # BatchNorm moving averages ({} without BatchNorm).
  opt_state: Any
  rng: jax.Array  # uint32 key data of the run's base key.
  # float32 moving average of `params` ({} when ema_decay is 0).
  ema_params: Any = dataclasses.field(default_factory=dict)


def seed_key_data(seed: int) -> np.ndarray:
  """The raw data (uint32) of `jax.random.key(seed)`, for any int seed."""
  return np.asarray(jax.random.key_data(jax.random.key(seed)))


def jit_data_movement(fn: Callable, **jit_kwargs) -> Callable:
  """`jax.jit` for a program that only moves data (stacking trials, slicing
  one out of a population), bit-exact at any optimisation level: on CPU
  compiled without XLA's backend optimisations, which cost LLVM time and gain
  nothing for a copy run a few times."""
  options = ({"xla_backend_optimization_level": 0}
             if jax.default_backend() == "cpu" else None)
  return jax.jit(fn, compiler_options=options, **jit_kwargs)


def create_train_state(model, tx: optax.GradientTransformation, sample_inputs,
                       seed: int | jax.Array, ema: bool = False) -> TrainState:
  """Initializes parameters and optimizer state (call under jax.jit).

  `seed` is an int or its `seed_key_data` (an argument, so that one compiled
  initialisation serves every seed). With `ema`, `ema_params` starts as a
  float32 copy of the parameters.
  """
  key = (jax.random.key(seed) if isinstance(seed, int)
         else jax.random.wrap_key_data(seed))
  init_key, run_key = jax.random.split(key)
  variables = model.init({"params": init_key, "dropout": init_key},
                         sample_inputs, train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=tx.init(params),
                    rng=jax.random.key_data(run_key),
                    ema_params=_float32_copy(params) if ema else {})


def _float32_copy(params) -> Any:
  # A copy, not the same buffers: the state is donated leaf by leaf.
  return jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params)


def ema_decay_at(step: jax.Array, ema_decay: float) -> jax.Array:
  """d_t = min(ema_decay, (1 + t) / (10 + t)) for update t (1-based)."""
  t = step.astype(jnp.float32)
  return jnp.minimum(jnp.float32(ema_decay), (1.0 + t) / (10.0 + t))


def update_ema(ema_params, params, step: jax.Array, ema_decay: float) -> Any:
  """The moving average after update `step` produced `params`."""
  d = ema_decay_at(step, ema_decay)
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p.astype(jnp.float32),
                      ema_params, params)


def ema_state(state: TrainState) -> TrainState:
  """`state` with its parameters replaced by their moving average.

  BatchNorm statistics stay the raw model's: they are already a moving
  average (of `batch_norm.momentum`), and late in training, where the
  averaged parameters matter, the raw parameters move slowly enough that
  their statistics fit the averaged ones.
  """
  if not state.ema_params:
    raise ValueError("the state holds no ema_params (config.ema_decay is 0)")
  params = jax.tree.map(lambda e, p: e if e.dtype == p.dtype else e.astype(p.dtype),
                        state.ema_params, state.params)
  return state.replace(params=params)


def _variables(state: TrainState, params) -> dict[str, Any]:
  variables = {"params": params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return variables


def float32_logits(logits: Any) -> Any:
  """`logits` with floating-point leaves in float32, whatever the compute dtype."""
  return jax.tree.map(
      lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating)
      else x, logits)


def mean_loss(loss: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """The batch's loss: `mean(loss)`, or `sum(loss * w) / sum(w)` with weights.

  Under jit both sums run over the global batch (XLA adds the cross-device
  reductions), so the result is the masked mean of the whole batch for any
  number of devices and hosts, not a mean of per-device means.
  """
  if weights is None:
    return jnp.mean(loss)
  weights = jnp.broadcast_to(weights.astype(jnp.float32), loss.shape)
  total = jnp.sum(jnp.where(weights > 0, loss * weights, 0.0))
  return total / jnp.maximum(jnp.sum(weights), jnp.finfo(jnp.float32).tiny)


def make_train_step(model, tx: optax.GradientTransformation,
                    loss_fn: Callable, grad_clip_norm: float,
                    weights_fn: Callable | None = None,
                    ema_decay: float = 0.0) -> Callable:
  """Returns `train_step(state, batch) -> (state, metrics)`.

  The loss is `mean_loss(loss_fn(logits, labels), weights_fn(labels))`.
  With `ema_decay > 0` the step also updates `state.ema_params` (see the
  module docstring); the state must have been created with `ema=True`.
  Metrics hold the unclipped global gradient norm, the loss, whether the step
  was clipped and the learning rate used, as scalars for this one step.
  """

  def train_step(state: TrainState, batch: Batch):
    dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng),
                                     state.step)

    def loss_of(params):
      outputs, new_model_state = model.apply(
          _variables(state, params), batch["inputs"], train=True,
          rngs={"dropout": dropout_key}, mutable=["batch_stats"])
      outputs = float32_logits(outputs)
      weights = None if weights_fn is None else weights_fn(batch["label"])
      loss = mean_loss(loss_fn(outputs, batch["label"]), weights)
      return loss, new_model_state

    (loss, new_model_state), grads = jax.value_and_grad(
        loss_of, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    if grad_clip_norm > 0:
      clipped = grad_norm > grad_clip_norm
      scale = jnp.where(clipped, grad_clip_norm / grad_norm, 1.0)
      grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
    else:
      clipped = jnp.zeros((), jnp.bool_)
    learning_rate = optimizers.current_learning_rate(state.opt_state)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if ema_decay > 0:
      ema_params = update_ema(ema_params, params, state.step + 1, ema_decay)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        batch_stats=new_model_state.get("batch_stats", state.batch_stats),
        ema_params=ema_params)
    metrics = {"train/loss": loss, "train/grad_norm": grad_norm,
               "train/clipped": clipped.astype(jnp.float32),
               "train/learning_rate": learning_rate}
    return new_state, metrics

  return train_step


def make_eval_step(model, loss_fn: Callable, correct_fn: Callable,
                   weights_fn: Callable | None = None) -> Callable:
  """Returns `eval_step(state, batch) -> sums` weighted by `batch["weight"]`.

  Sums: loss_sum, num_correct and num_examples (rows of weight 1, padding
  excluded). With a `weights_fn` or a per-position loss (rank > 1) each
  position weighs its row's weight times `weights_fn(labels)`, and
  num_targets, the total weight of the positions scored, is added.
  """

  def eval_step(state: TrainState, batch: Batch) -> Metrics:
    outputs = model.apply(_variables(state, state.params), batch["inputs"],
                          train=False)
    outputs = float32_logits(outputs)
    weight = batch["weight"]
    loss = loss_fn(outputs, batch["label"]).astype(jnp.float32)
    correct = correct_fn(outputs, batch["label"]).astype(jnp.float32)
    per_position = weights_fn is not None or loss.ndim > 1
    position_weight = weight.reshape(weight.shape + (1,) * (loss.ndim - 1))
    if weights_fn is not None:
      position_weight = position_weight * weights_fn(batch["label"]).astype(
          jnp.float32)
    # Padding may hold anything; `where` keeps a NaN there out of the sums.
    sums = {"loss_sum": jnp.sum(jnp.where(position_weight > 0,
                                          loss * position_weight, 0.0)),
            "num_correct": jnp.sum(correct * position_weight),
            "num_examples": jnp.sum(weight)}
    if per_position:
      sums["num_targets"] = jnp.sum(position_weight)
    return sums

  return eval_step


def for_loop(step_fn: Callable) -> Callable:
  """`step(state, batches, buffer, examples) -> (state, buffer)`: the loop's
  compiled step.

  `batches` holds k batches along a leading axis; step t trains on batch
  `t % k`, so one transfer serves k steps and the host feeds the same device
  array until the next. With training examples on the devices (`examples`
  not empty) the batches are example indices, gathered there
  (device_examples.py). The step's metrics go to row `t % rows` of `buffer`
  (float32[rows, len(STEP_METRICS)]), which stays on the device until the
  host fetches it, once per log interval.
  """

  def step_in_loop(state: TrainState, batches: Batch, buffer: jax.Array,
                   examples: Batch):
    k = next(iter(batches.values())).shape[0]
    batch = {name: jax.lax.dynamic_index_in_dim(x, state.step % k, keepdims=False)
             for name, x in batches.items()}
    new_state, metrics = step_fn(state, device_examples.gather(batch, examples))
    row = jnp.stack([metrics[name].astype(jnp.float32) for name in STEP_METRICS])
    return new_state, buffer.at[state.step % buffer.shape[0]].set(row)

  return step_in_loop
