"""Train state, and the pure train and eval steps compiled once per run.

The steps are pure functions of arrays: the learning rate and every other
continuous optimizer hyperparameter live in `state.opt_state`, the RNG in
`state.rng` (raw key data, so checkpoints stay portable), and the dropout key
of step t is `fold_in(key(state.rng), t)`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from tuning_playbook import optimizers

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


def create_train_state(model, tx: optax.GradientTransformation, sample_inputs,
                       seed: int) -> TrainState:
  """Initializes parameters and optimizer state (call under jax.jit)."""
  key = jax.random.key(seed)
  init_key, run_key = jax.random.split(key)
  variables = model.init({"params": init_key, "dropout": init_key},
                         sample_inputs, train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=tx.init(params),
                    rng=jax.random.key_data(run_key))


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
                    weights_fn: Callable | None = None) -> Callable:
  """Returns `train_step(state, batch) -> (state, metrics)`.

  The loss is `mean_loss(loss_fn(logits, labels), weights_fn(labels))`.
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
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        batch_stats=new_model_state.get("batch_stats", state.batch_stats))
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
  """`step(state, batches, buffer) -> (state, buffer)`: the loop's compiled step.

  `batches` holds k batches along a leading axis; step t trains on batch
  `t % k`, so one transfer serves k steps and the host feeds the same device
  array until the next. The step's metrics go to row `t % rows` of `buffer`
  (float32[rows, len(STEP_METRICS)]), which stays on the device until the
  host fetches it, once per log interval.
  """

  def step_in_loop(state: TrainState, batches: Batch, buffer: jax.Array):
    k = next(iter(batches.values())).shape[0]
    batch = {name: jax.lax.dynamic_index_in_dim(x, state.step % k, keepdims=False)
             for name, x in batches.items()}
    new_state, metrics = step_fn(state, batch)
    row = jnp.stack([metrics[name].astype(jnp.float32) for name in STEP_METRICS])
    return new_state, buffer.at[state.step % buffer.shape[0]].set(row)

  return step_in_loop
