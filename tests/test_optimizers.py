"""The optimizers against numpy written from the playbook's update rules."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tuning_playbook import config_schema
from tuning_playbook.training import optimizers

NUM_STEPS = 8
HPARAMS = dict(learning_rate=0.3, momentum=0.8, rho=0.7, beta1=0.8,
               beta2=0.95, epsilon=0.01, weight_decay=0.05, warmup_steps=2,
               hold_steps=0, decay_steps=5, end_learning_rate_factor=0.1)
OTHER_HPARAMS = dict(learning_rate=0.07, momentum=0.5, rho=0.9, beta1=0.6,
                     beta2=0.99, epsilon=0.001, weight_decay=0.2,
                     warmup_steps=3, hold_steps=1, decay_steps=3,
                     end_learning_rate_factor=0.3)


def _config(name="adam", schedule="cosine", weight_decay_type="decoupled",
            **hparams):
  config = config_schema.base_config().optimizer
  config.name = name
  config.schedule = schedule
  config.weight_decay_type = weight_decay_type
  config.update({**HPARAMS, **hparams})
  return config


def _params():
  rng = np.random.default_rng(0)
  return {"dense": {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
                    "bias": rng.normal(size=(4,)).astype(np.float32)}}


def _grads(num_steps=NUM_STEPS):
  rng = np.random.default_rng(1)
  return [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32),
                       _params()) for _ in range(num_steps)]


def _f32(x):
  return float(np.float32(x))


def np_learning_rate(t, schedule, learning_rate, warmup_steps, decay_steps,
                     end_learning_rate_factor, hold_steps=0, **unused):
  """Linear warmup from 0, a hold at the peak, then constant / linear / cosine
  decay."""
  peak, end = learning_rate, end_learning_rate_factor
  if t < warmup_steps:
    return peak * t / warmup_steps
  progress = min(max(t - warmup_steps - hold_steps, 0) / decay_steps, 1.0)
  if schedule == "constant":
    return peak
  if schedule == "linear":
    return peak * (1 - (1 - end) * progress)
  return peak * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * progress)))


def np_reference(name, schedule, weight_decay_type, hp, params, grads_seq):
  """Parameters after each step, from the FAQ's update rules in float64."""
  hp = {k: _f32(v) for k, v in hp.items()}
  gamma, rho, eps = hp["momentum"], hp["rho"], hp["epsilon"]
  b1, b2, wd = hp["beta1"], hp["beta2"], hp["weight_decay"]
  theta = {k: np.asarray(v, np.float64) for k, v in _flat(params).items()}
  zeros = {k: np.zeros_like(v) for k, v in theta.items()}
  v = {k: np.ones_like(x) for k, x in theta.items()} if name == "rmsprop" \
      else dict(zeros)
  m = dict(zeros)
  history = []
  for t, grads in enumerate(grads_seq):
    eta = np_learning_rate(t, schedule, **hp)
    new_theta = {}
    for k, th in theta.items():
      g = np.asarray(_flat(grads)[k], np.float64)
      if weight_decay_type == "l2":
        g = g + wd * th
      if name == "sgd":
        new = th - eta * g
      elif name == "momentum":
        v[k] = gamma * v[k] + g
        new = th - eta * v[k]
      elif name == "nesterov":
        v[k] = gamma * v[k] + g
        new = th - eta * (gamma * v[k] + g)
      elif name == "rmsprop":
        v[k] = rho * v[k] + (1 - rho) * g**2
        m[k] = gamma * m[k] + eta / np.sqrt(v[k] + eps) * g
        new = th - m[k]
      else:
        m[k] = b1 * m[k] + (1 - b1) * g
        v[k] = b2 * v[k] + (1 - b2) * g**2
        b = np.sqrt(1 - b2**(t + 1)) / (1 - b1**(t + 1))
        num = m[k] if name == "adam" else b1 * m[k] + (1 - b1) * g
        new = th - eta * num / (np.sqrt(v[k]) + eps) * b
      if weight_decay_type == "decoupled":
        new = new - eta * wd * th
      new_theta[k] = new
    theta = new_theta
    history.append(theta)
  return history


def _flat(tree):
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_close(actual_tree, expected_flat):
  """Equal to 1e-6 relative, elementwise or to the largest entry of the array.

  float32 rounds each entry to about 1e-7 of its own size per operation, so an
  entry near 0 inherits absolute errors from the larger values it came from.
  """
  actual = _flat(actual_tree)
  assert actual.keys() == expected_flat.keys()
  for k, expected in expected_flat.items():
    np.testing.assert_allclose(np.asarray(actual[k], np.float64), expected,
                               rtol=1e-6, atol=1e-6 * np.abs(expected).max(),
                               err_msg=k)


def _jitted_step(tx, traces=None):
  def step(params, state, grads):
    if traces is not None:
      traces.append(1)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return jax.jit(step)


@pytest.mark.parametrize("weight_decay_type", ["decoupled", "l2"])
@pytest.mark.parametrize("name", config_schema.OPTIMIZERS)
def test_update_rules_match_playbook_equations(name, weight_decay_type):
  config = _config(name, "cosine", weight_decay_type)
  tx = optimizers.create_optimizer(config, max_train_steps=100)
  params = jax.tree.map(jnp.asarray, _params())
  state = tx.init(params)
  step = _jitted_step(tx)
  grads_seq = _grads()
  expected = np_reference(name, "cosine", weight_decay_type, HPARAMS,
                          _params(), grads_seq)
  learning_rates = set()
  for t, grads in enumerate(grads_seq):
    learning_rates.add(float(optimizers.current_learning_rate(state)))
    params, state = step(params, state, grads)
    _assert_close(params, expected[t])
  assert len(learning_rates) >= 5  # Warmup and decay both exercised.


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_rmsprop_accumulates_scheduled_learning_rate(schedule):
  config = _config("rmsprop", schedule, "decoupled")
  tx = optimizers.create_optimizer(config, max_train_steps=100)
  params = _params()
  state = tx.init(params)
  step = _jitted_step(tx)
  grads_seq = _grads()
  expected = np_reference("rmsprop", schedule, "decoupled", HPARAMS, params,
                          grads_seq)
  for t, grads in enumerate(grads_seq):
    params, state = step(params, state, grads)
    _assert_close(params, expected[t])


def _closed_forms(schedule, peak, warmup, decay, end):
  """(step, lr) at 0, mid-warmup, end of warmup, mid decay, end, beyond."""
  final = peak if schedule == "constant" else end * peak
  mid = {"constant": peak, "linear": peak * (1 + end) / 2,
         "cosine": peak * (1 + end) / 2}[schedule]
  quarter = {"constant": peak, "linear": peak * (1 - 0.25 * (1 - end)),
             "cosine": peak * (end + (1 - end) * (2 + math.sqrt(2)) / 4)}
  return [(0, 0.0), (warmup // 2, peak * (warmup // 2) / warmup),
          (warmup, peak), (warmup + decay // 4, quarter[schedule]),
          (warmup + decay // 2, mid), (warmup + decay, final),
          (warmup + decay + 37, final)]


@pytest.mark.parametrize("end", [0.0, 0.25])
@pytest.mark.parametrize("schedule", config_schema.SCHEDULES)
def test_schedule_values_at_key_steps(schedule, end):
  peak, warmup, decay = 0.5, 10, 40
  lr_fn = jax.jit(lambda step, lr, w, d, e: optimizers.learning_rate_at(
      step, schedule=schedule, learning_rate=lr, warmup_steps=w,
      decay_steps=d, end_learning_rate_factor=e))
  for step, expected in _closed_forms(schedule, peak, warmup, decay, end):
    actual = lr_fn(jnp.int32(step), jnp.float32(peak), jnp.float32(warmup),
                   jnp.float32(decay), jnp.float32(end))
    assert actual.dtype == jnp.float32
    np.testing.assert_allclose(float(actual), expected, rtol=1e-6, atol=1e-7,
                               err_msg=f"{schedule} at step {step}")


@pytest.mark.parametrize("schedule", config_schema.SCHEDULES)
def test_schedule_without_warmup_starts_at_peak(schedule):
  lr = optimizers.learning_rate_at(0, schedule=schedule, learning_rate=0.2,
                                   warmup_steps=0, decay_steps=10,
                                   end_learning_rate_factor=0.0)
  np.testing.assert_allclose(float(lr), 0.2, rtol=1e-7)
  lr = optimizers.learning_rate_at(10, schedule=schedule, learning_rate=0.2,
                                   warmup_steps=0, decay_steps=10,
                                   end_learning_rate_factor=0.0)
  np.testing.assert_allclose(float(lr), 0.2 if schedule == "constant" else 0.0,
                             atol=1e-8)


@pytest.mark.parametrize("mode,hold,decay", [
    ("prepended", 0, 130), ("prepended", 20, 110), ("included", 0, 100),
    ("included", 20, 80)])
def test_decay_steps_zero_means_rest_of_training(mode, hold, decay):
  tx = optimizers.create_optimizer(
      _config(warmup_steps=30, decay_steps=0, warmup_mode=mode,
              hold_steps=hold), max_train_steps=130)
  hp = optimizers.hyperparameters(tx.init(_params()))
  assert float(hp["decay_steps"]) == decay
  assert float(hp["warmup_steps"]) == 30.0
  assert float(hp["hold_steps"]) == hold


@pytest.mark.parametrize("name", ["nesterov", "rmsprop", "nadam"])
def test_new_hyperparameters_reuse_the_compiled_step(name):
  tx = optimizers.create_optimizer(_config(name), max_train_steps=100)
  traces = []
  step = _jitted_step(tx, traces)
  grads_seq = [jax.tree.map(jnp.asarray, g) for g in _grads()]

  def run(state):
    params = jax.tree.map(jnp.asarray, _params())
    for grads in grads_seq:
      params, state = step(params, state, grads)
    return params

  run(tx.init(_params()))
  swapped = optimizers.with_hyperparameters(tx.init(_params()), OTHER_HPARAMS)
  other_tx = optimizers.create_optimizer(
      _config(name, **OTHER_HPARAMS), max_train_steps=100)
  expected = np_reference(name, "cosine", "decoupled", OTHER_HPARAMS,
                          _params(), grads_seq)[-1]
  for state in (swapped, other_tx.init(_params())):
    assert {k: float(v) for k, v in
            optimizers.hyperparameters(state).items()} == pytest.approx(
                OTHER_HPARAMS, rel=1e-6)
    _assert_close(run(state), expected)
  assert len(traces) == 1
  assert step._cache_size() == 1  # pylint: disable=protected-access


def test_trials_batch_with_vmap_over_hyperparameters():
  name = "adam"
  tx = optimizers.create_optimizer(_config(name), max_train_steps=100)
  grads_seq = _grads(5)
  trials = [HPARAMS, OTHER_HPARAMS]
  batched = {k: jnp.asarray([t[k] for t in trials], jnp.float32)
             for k in optimizers.HYPERPARAMETERS}

  def run(values):
    params = jax.tree.map(jnp.asarray, _params())
    state = optimizers.with_hyperparameters(tx.init(params), values)
    for grads in grads_seq:
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
    return params

  params = jax.jit(jax.vmap(run))(batched)
  for i, trial in enumerate(trials):
    expected = np_reference(name, "cosine", "decoupled", trial, _params(),
                            grads_seq)[-1]
    _assert_close(jax.tree.map(lambda x, i=i: x[i], params), expected)


def test_state_is_arrays_and_keeps_its_layout():
  tx = optimizers.create_optimizer(_config("rmsprop"), max_train_steps=100)
  params = {"w": jnp.ones((2, 3), jnp.bfloat16), "b": jnp.zeros((3,))}
  state = tx.init(params)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
  assert state.count.dtype == jnp.int32 and state.count.shape == ()
  assert sorted(state.hyperparams) == sorted(optimizers.HYPERPARAMETERS)
  assert all(v.dtype == jnp.float32 and v.shape == ()
             for v in state.hyperparams.values())
  grads = jax.tree.map(jnp.ones_like, params)
  _, new_state = tx.update(grads, state, params)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert (jax.tree.map(lambda x: x.dtype, new_state)
          == jax.tree.map(lambda x: x.dtype, state))


def test_step_count_and_learning_rate_advance_per_update():
  config = _config("momentum", "linear")
  tx = optax.chain(optax.clip_by_global_norm(1e3),
                   optimizers.create_optimizer(config, max_train_steps=100))
  params = _params()
  state = tx.init(params)
  step = _jitted_step(tx)
  for t, grads in enumerate(_grads()):
    assert int(optimizers.step_count(state)) == t
    np.testing.assert_allclose(
        float(optimizers.current_learning_rate(state)),
        np_learning_rate(t, "linear", **HPARAMS), rtol=1e-6, atol=1e-8)
    params, state = step(params, state, grads)
  assert optimizers.step_count(state).dtype == jnp.int32
  assert int(optimizers.step_count(state)) == NUM_STEPS
  state = optimizers.with_hyperparameters(state, {"learning_rate": 2.0})
  assert float(optimizers.hyperparameters(state)["learning_rate"]) == 2.0


@pytest.mark.parametrize("key,allowed", [
    ("name", config_schema.OPTIMIZERS),
    ("schedule", config_schema.SCHEDULES),
    ("weight_decay_type", config_schema.WEIGHT_DECAY_TYPES)])
def test_unknown_names_raise_with_allowed_list(key, allowed):
  config = _config()
  config[key] = "bogus"
  with pytest.raises(ValueError) as info:
    optimizers.create_optimizer(config, max_train_steps=10)
  message = str(info.value)
  assert f"config.optimizer.{key}='bogus'" in message
  assert ", ".join(allowed) in message


def test_unknown_hyperparameter_is_rejected():
  tx = optimizers.create_optimizer(_config(), max_train_steps=10)
  with pytest.raises(ValueError, match="learning_rat"):
    optimizers.with_hyperparameters(tx.init(_params()), {"learning_rat": 1.0})


@pytest.mark.parametrize("name", ["sgd", "rmsprop"])
def test_state_round_trips_through_orbax(name, tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  tx = optimizers.create_optimizer(_config(name), max_train_steps=100)
  params = jax.tree.map(jnp.asarray, _params())
  step = _jitted_step(tx)
  grads_seq = _grads(3)
  params, state = step(params, tx.init(params), grads_seq[0])
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "state", state)
  with ocp.StandardCheckpointer() as checkpointer:
    restored = checkpointer.restore(tmp_path / "state",
                                    jax.eval_shape(tx.init, params))
  assert int(optimizers.step_count(restored)) == 1
  assert optimizers.step_count(restored).dtype == jnp.int32
  for grads in grads_seq[1:]:
    params, restored = step(params, restored, grads)
  expected = np_reference(name, "cosine", "decoupled", HPARAMS, _params(),
                          grads_seq)[-1]
  _assert_close(params, expected)


def test_with_hyperparameters_keeps_placement_of_committed_state():
  tx = optimizers.create_optimizer(_config(), max_train_steps=10)
  device = jax.devices()[0]
  state = jax.device_put(tx.init(_params()), device)
  state = optimizers.with_hyperparameters(state, {"beta2": 0.9})
  value = optimizers.hyperparameters(state)["beta2"]
  assert value.committed and value.sharding == state.count.sharding
  assert value.dtype == jnp.float32
  np.testing.assert_allclose(float(value), 0.9, rtol=1e-7)
