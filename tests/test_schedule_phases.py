"""Warmup prepended to the schedule, the constant hold before the decay, and
the run's real total of steps."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from tuning_playbook.analysis import trial_data
from tuning_playbook.common import config_validation
from tuning_playbook import config_schema
from tuning_playbook.training import optimizers

CNN_CONFIG = os.path.join(helpers.REPO, "configs", "mnist1d_cnn.py")
PEAK = 0.5


def _config(max_train_steps=10, **optimizer):
  config = config_schema.base_config()
  config.workload = "mnist1d_cnn"
  config.max_train_steps = max_train_steps
  config.optimizer.learning_rate = PEAK
  config.optimizer.update(optimizer)
  return config


def _learning_rates(config) -> list[float]:
  """The learning rate of every update of a run of `config`, in order."""
  config_validation.validate(config)
  tx = optimizers.create_optimizer(config.optimizer, config.max_train_steps)
  params = {"w": jnp.zeros((2,))}
  state = tx.init(params)
  update = jax.jit(tx.update)
  rates = []
  for _ in range(config_schema.total_train_steps(config)):
    rates.append(float(optimizers.current_learning_rate(state)))
    _, state = update(jax.tree.map(jnp.ones_like, params), state, params)
  return rates


def _decay(schedule, progress, end):
  if schedule == "linear":
    return 1 - (1 - end) * progress
  return end + (1 - end) * (1 + math.cos(math.pi * progress)) / 2


@pytest.mark.parametrize("schedule,end", [("linear", 0.0), ("cosine", 0.0),
                                          ("cosine", 0.1)])
def test_prepended_warmup_then_hold_then_decay_step_by_step(schedule, end):
  config = _config(10, schedule=schedule, warmup_steps=3, hold_steps=2,
                   end_learning_rate_factor=end)
  assert config_schema.total_train_steps(config) == 13
  # Warmup from 0 over 3 updates, the peak for the 2 held updates, then the
  # decay over the 10 - 2 = 8 updates left of max_train_steps.
  expected = ([0.0, PEAK / 3, 2 * PEAK / 3] + [PEAK] * 2
              + [PEAK * _decay(schedule, k / 8, end) for k in range(8)])
  np.testing.assert_allclose(_learning_rates(config), expected, rtol=1e-6,
                             atol=1e-7)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("hold", [0, 4])
def test_after_a_prepended_warmup_the_schedule_is_the_one_without(schedule, hold):
  without = _learning_rates(_config(12, schedule=schedule, hold_steps=hold))
  with_warmup = _learning_rates(_config(12, schedule=schedule, hold_steps=hold,
                                        warmup_steps=5))
  assert len(with_warmup) == len(without) + 5
  np.testing.assert_allclose(with_warmup[5:], without, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_included_warmup_keeps_the_old_schedule(schedule):
  config = _config(10, schedule=schedule, warmup_steps=3,
                   warmup_mode="included")
  assert config_schema.total_train_steps(config) == 10
  # The warmup's 3 updates come out of the 10; the decay spans the other 7.
  expected = ([0.0, PEAK / 3, 2 * PEAK / 3]
              + [PEAK * _decay(schedule, k / 7, 0.0) for k in range(7)])
  np.testing.assert_allclose(_learning_rates(config), expected, rtol=1e-6,
                             atol=1e-7)


def test_included_warmup_with_a_hold():
  config = _config(10, schedule="linear", warmup_steps=2, hold_steps=3,
                   warmup_mode="included")
  expected = [0.0, PEAK / 2] + [PEAK] * 3 + [PEAK * (1 - k / 5) for k in range(5)]
  np.testing.assert_allclose(_learning_rates(config), expected, rtol=1e-6)


def test_an_explicit_decay_ends_before_the_run():
  config = _config(10, schedule="linear", warmup_steps=2, hold_steps=3,
                   decay_steps=4, end_learning_rate_factor=0.5)
  expected = ([0.0, PEAK / 2] + [PEAK] * 3
              + [PEAK * (1 - 0.5 * k / 4) for k in range(5)] + [PEAK / 2] * 2)
  np.testing.assert_allclose(_learning_rates(config), expected, rtol=1e-6)


@pytest.mark.parametrize("overrides,key,allowed", [
    ({"hold_steps": -1}, "optimizer.hold_steps", "[0, 10]"),
    ({"hold_steps": 11}, "optimizer.hold_steps", "[0, 10]"),
    ({"hold_steps": 6, "decay_steps": 5}, "optimizer.decay_steps", "[0, 4]"),
    ({"warmup_steps": 11}, "optimizer.warmup_steps", "[0, 10]"),
    ({"warmup_mode": "included", "warmup_steps": 4, "hold_steps": 7},
     "optimizer.hold_steps", "[0, 6]"),
    ({"warmup_mode": "included", "warmup_steps": 4, "hold_steps": 2,
      "decay_steps": 5}, "optimizer.decay_steps", "[0, 4]"),
    ({"warmup_mode": "appended"}, "optimizer.warmup_mode",
     "prepended, included"),
])
def test_phases_that_do_not_fit_name_their_key(overrides, key, allowed):
  with pytest.raises(config_schema.ConfigError) as info:
    config_validation.validate(_config(10, **overrides))
  message = str(info.value)
  assert message.startswith(f"config.{key}=") and allowed in message


def test_phases_that_fit_exactly_are_valid():
  config_validation.validate(_config(10, warmup_steps=10, hold_steps=4,
                                 decay_steps=6))
  config_validation.validate(_config(10, warmup_mode="included", warmup_steps=4,
                                 hold_steps=2, decay_steps=4))


def test_a_bad_hold_exits_2_before_compiling(tmp_path):
  result = helpers.run_main(str(tmp_path / "run"),
                            "--config.optimizer.hold_steps=36")
  assert result.returncode == 2, result.stderr[-3000:]
  assert "config.optimizer.hold_steps=36 is invalid" in result.stderr
  assert not os.path.exists(tmp_path / "run" / "config.json")


def test_total_train_steps_of_old_and_new_records():
  def trial(summary, config):
    return trial_data.Trial("0", {}, "", summary, config, [], (), [])
  prepended = {"max_train_steps": 100,
               "optimizer": {"warmup_steps": 10, "warmup_mode": "prepended"}}
  assert trial(None, prepended).total_train_steps == 110
  assert trial({"total_train_steps": 120}, prepended).total_train_steps == 120
  included = {"max_train_steps": 100,
              "optimizer": {"warmup_steps": 10, "warmup_mode": "included"}}
  assert trial(None, included).total_train_steps == 100
  # Records from before warmup_mode existed counted warmup within the steps.
  assert trial(None, {"max_train_steps": 100, "optimizer": {
      "warmup_steps": 10}}).total_train_steps == 100


@pytest.mark.slow
def test_mnist1d_cnn_trains_warmup_plus_max_train_steps(tmp_path):
  workdir = tmp_path / "run"
  result = helpers.run_main(
      str(workdir), f"--config.data.data_dir={tmp_path / 'data'}",
      "--config.max_train_steps=20", "--config.optimizer.warmup_steps=4",
      "--config.optimizer.hold_steps=6", "--config.optimizer.schedule=linear",
      "--config.eval_every_steps=10", "--config.log_every_steps=5",
      "--config.data.batches_per_transfer=4", config=CNN_CONFIG)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = helpers.read_json(str(workdir / "summary.json"))
  assert summary["status"] == "completed"
  assert summary["final_step"] == summary["total_train_steps"] == 24
  assert summary["max_train_steps"] == 20
  rows = helpers.read_jsonl(str(workdir / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [5, 10, 15, 20, 24]
  assert [r["step"] for r in rows if "eval/validation/error_rate" in r] == [
      10, 20, 24]
  grad_steps = [r["step"] for r in helpers.read_jsonl(str(workdir / "grad_norms.jsonl"))]
  assert grad_steps == list(range(1, 25))
  kept = {int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()}
  assert 24 in kept and summary["best_step"] in kept
  # Step s uses the rate after s - 1 updates: warmup over 4, hold 6, then a
  # linear decay to 0 over the 14 steps left of the 20.
  peak = 0.14
  def expected(step):
    count = step - 1
    if count < 4:
      return peak * count / 4
    return peak * (1 - min(max(count - 10, 0) / 14, 1))
  for row in rows:
    assert row["train/learning_rate"] == pytest.approx(
        expected(row["step"]), rel=1e-5), row["step"]
