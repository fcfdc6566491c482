"""FLOPs per step against a hand count, the perf/* metrics of a real run,
input-bound detection, and the profiling and throughput config keys."""

import logging
import os
import time

import jax
import numpy as np
import pytest

from tests import helpers
from tuning_playbook import config_schema
from tuning_playbook import device_examples
from tuning_playbook import throughput
from tuning_playbook import train

MLP_CONFIG = os.path.join(helpers.REPO, "configs", "mnist1d_mlp.py")
BATCH = 400  # 100 examples per device on the 4 test devices.
LAYERS = ((40, 100), (100, 100), (100, 10))  # mnist1d_mlp: width 100, depth 2.


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("mnist1d"))


def mlp_config(data_dir, **overrides):
  values = {"data.data_dir": data_dir, "batch_size": BATCH, "max_train_steps": 100,
            "eval_every_steps": 100, "log_every_steps": 20,
            "data.batches_per_transfer": 4, **overrides}
  return helpers.load_config(MLP_CONFIG, **values)


def hand_count_flops(batch: int) -> float:
  """Multiply-adds of the dense layers in one training step, 2 FLOPs each.

  Forward: 2 * in * out per layer and example. Backward: the weight gradient
  costs as much again, and so does the input gradient, except in the first
  layer, whose input (the data) needs none: about 2x the forward pass.
  """
  forward = sum(2 * n_in * n_out for n_in, n_out in LAYERS) * batch
  first_input_gradient = 2 * LAYERS[0][0] * LAYERS[0][1] * batch
  return 3 * forward - first_input_gradient


@pytest.mark.parametrize("kind,peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5p", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
    ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12), ("cpu", None), ("TFRT_CPU_0", None)])
def test_peak_per_device_kind(kind, peak):
  assert throughput.peak_flops_per_device(kind) == peak


def test_step_flops_match_a_hand_count_and_compile_once(data_dir, tmp_path):
  config = mlp_config(data_dir)
  trainer = train.Trainer([config], [str(tmp_path)], [train.validate_before_compiling(config)])
  trainer.train(40)
  flops = trainer.records[0].throughput.flops_per_step
  expected = hand_count_flops(BATCH)  # 32.8 MFLOPs.
  # XLA counts every multiply-add of the dots, so never less than the hand
  # count; the rest is elementwise work: Adam's update (about 20 FLOPs per
  # parameter, done on each of the 4 devices, since parameters are
  # replicated), biases, ReLUs and the softmax loss, under 10% here.
  assert expected <= flops <= 1.10 * expected, (flops, expected)
  # The compilation the FLOPs came from is the one the loop runs.
  assert trainer.train_step._cache_size() == 1  # pylint: disable=protected-access
  trainer.finish()


def test_perf_metrics_of_an_interval_match_its_wall_time(data_dir, tmp_path):
  config = mlp_config(data_dir)
  trainer = train.Trainer([config], [str(tmp_path)], [train.validate_before_compiling(config)])
  trainer.train(20)  # Compiles.
  began = time.perf_counter()
  trainer.train(40)  # One log interval: steps 21..40.
  wall = time.perf_counter() - began
  trainer.finish()
  rows = {r["step"]: r for r in helpers.read_jsonl(str(tmp_path / "metrics.jsonl"))}
  row = rows[40]
  flops_per_step = trainer.records[0].throughput.flops_per_step
  assert row["perf/examples_per_second"] > 0 and row["perf/flops_per_second"] > 0
  steps_per_second = row["perf/examples_per_second"] / BATCH
  assert row["perf/flops_per_second"] == pytest.approx(flops_per_step * steps_per_second,
                                                       rel=1e-9)
  # The interval is the call, less the writing of its records.
  interval_seconds = 20 / steps_per_second
  assert 0.5 * wall <= interval_seconds <= wall
  assert "perf/mfu" not in row  # No known peak on CPU.
  assert 0 <= row["perf/input_wait_fraction"] < 1
  # Stopped at 40 of 100 steps: no summary (it resumes), the same perf figures.
  assert not os.path.exists(tmp_path / "summary.json")
  summary = trainer.records[0].throughput.summary()
  assert summary["perf"]["flops_per_step"] == flops_per_step
  assert summary["perf"]["device_count"] == jax.device_count()
  assert summary["perf"]["peak_flops_per_second"] is None


def test_mfu_against_the_peak_of_all_devices():
  monitor = throughput.ThroughputMonitor(
      batch_size=8, input_bound_threshold=0.2, device_kind="TPU v4", device_count=4)
  monitor.set_step_flops(1e12)
  row = monitor.interval(first_step=1, last_step=10, seconds=2.0, input_wait_seconds=0.0)
  assert row["perf/flops_per_second"] == pytest.approx(5e12)
  assert row["perf/mfu"] == pytest.approx(5e12 / (4 * 275e12))
  assert row["perf/examples_per_second"] == pytest.approx(40.0)
  assert monitor.summary()["perf"]["mfu"] == pytest.approx(row["perf/mfu"])


def _slow_input(monkeypatch, seconds):
  transfers = device_examples.transfers

  def slow(*args, **kwargs):
    for group in transfers(*args, **kwargs):
      time.sleep(seconds)
      yield group

  monkeypatch.setattr(device_examples, "transfers", slow)


def test_slow_input_is_flagged_with_the_figures(data_dir, tmp_path, monkeypatch,
                                                caplog):
  _slow_input(monkeypatch, 0.05)
  config = mlp_config(data_dir, **{"data.batches_per_transfer": 1,
                                   "log_every_steps": 5, "max_train_steps": 20,
                                   "eval_every_steps": 20})
  with caplog.at_level(logging.WARNING):
    summary = train.train_and_evaluate(config, str(tmp_path))
  bound = summary["input_bound"]
  assert bound["flagged"] and bound["threshold"] == 0.2
  assert bound["intervals"] == 4 and bound["intervals_over_threshold"] >= 3
  assert 0.5 < bound["mean_wait_fraction"] <= bound["max_wait_fraction"] <= 1
  assert bound["wait_seconds"] > 0.5  # About 19 waits of 50 ms.
  rows = helpers.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert max(r["perf/input_wait_fraction"] for r in rows) == pytest.approx(
      bound["max_wait_fraction"])
  warnings = [r.getMessage() for r in caplog.records if "Input-bound: steps" in r.getMessage()]
  assert warnings and "for the next batch" in warnings[0]
  assert "input_bound_warning_fraction=0.2" in warnings[0]
  assert helpers.read_json(str(tmp_path / "summary.json"))["input_bound"] == bound


def test_a_normal_run_is_not_flagged(data_dir, tmp_path, caplog):
  config = mlp_config(data_dir, **{"data.batches_per_transfer": 20})
  with caplog.at_level(logging.WARNING):
    summary = train.train_and_evaluate(config, str(tmp_path))
  bound = summary["input_bound"]
  assert not bound["flagged"] and bound["intervals_over_threshold"] == 0
  assert bound["intervals"] == 5 and bound["mean_wait_fraction"] < 0.2
  assert not [r for r in caplog.records if "Input-bound" in r.getMessage()]


@pytest.mark.parametrize("value,message", [
    ("3", "START:END"), ("a:b", "START:END"), ("1:2:3", "START:END"),
    ("0:2", "1 <= START"), ("5:3", "1 <= START"), ("3:41", "total_train_steps=40")])
def test_profile_steps_are_checked_before_compiling(value, message):
  config = helpers.load_config(profile_steps=value)
  with pytest.raises(config_schema.ConfigError, match="config.profile_steps") as e:
    config_schema.validate(config)
  assert message in str(e.value)


def test_profile_steps_accepts_a_range_within_the_run():
  config = helpers.load_config(profile_steps="3:40")
  config_schema.validate(config)
  assert config_schema.profile_step_range(config) == (3, 40)
  assert config_schema.profile_step_range(helpers.load_config()) is None


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5])
def test_input_bound_threshold_is_checked(value):
  config = helpers.load_config(input_bound_warning_fraction=value)
  with pytest.raises(config_schema.ConfigError,
                     match="config.input_bound_warning_fraction"):
    config_schema.validate(config)


def test_hand_count_is_the_three_passes():
  # 2 * (40*100 + 100*100 + 100*10) = 30,000 FLOPs forward per example.
  assert hand_count_flops(1) == 3 * 30_000 - 2 * 40 * 100
  assert np.isclose(hand_count_flops(BATCH), 32.8e6)
