"""FLOPs per step against a hand count, the perf/* metrics of a run on a fake
clock, input-bound detection, and the profiling and throughput config keys."""

import logging
import os

import jax
import pytest

from tests import helpers
from tuning_playbook.common import config_validation
from tuning_playbook import config_schema
from tuning_playbook.training import throughput
from tuning_playbook.training import train

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


class _Clock:
  """A clock that moves only when told to."""

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


class _TimedStep:
  """The trainer's train step, with each call taking `seconds` on `clock`."""

  def __init__(self, step, clock, seconds):
    self._step, self._clock, self._seconds = step, clock, seconds

  def __call__(self, *args, **kwargs):
    self._clock.now += self._seconds
    return self._step(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self._step, name)


def _timed_trainer(config, workdir, *, step_seconds, wait_seconds):
  """A Trainer on a fake clock: each step takes `step_seconds`, and each
  transfer is waited for `wait_seconds` once the devices are idle (a wait
  that counts)."""
  trainer = train.Trainer([config], [workdir], [train.validate_before_compiling(config)])
  clock = _Clock()
  trainer.clock = clock
  trainer.train_step = _TimedStep(trainer.train_step, clock, step_seconds)
  transfers = trainer.batches

  def waited_for():
    for transfer in transfers:
      trainer.metrics_buffer.block_until_ready()
      clock.now += wait_seconds
      yield transfer

  trainer.batches = waited_for()
  return trainer


def test_perf_metrics_of_an_interval_come_from_its_clock(data_dir, tmp_path):
  config = mlp_config(data_dir)
  trainer = _timed_trainer(config, str(tmp_path), step_seconds=1 / 64,
                           wait_seconds=1 / 16)
  trainer.train(20)  # Compiles.
  trainer.train(40)  # One log interval: steps 21..40.
  trainer.finish()
  rows = {r["step"]: r for r in helpers.read_jsonl(str(tmp_path / "metrics.jsonl"))}
  row = rows[40]
  flops_per_step = trainer.records[0].throughput.flops_per_step
  # 20 steps of 1/64 s and 5 transfers (4 steps each) waited 1/16 s: 0.625 s,
  # half of it waiting: 32 steps/s of 400 examples.
  assert row["perf/examples_per_second"] == pytest.approx(12_800)
  assert row["perf/flops_per_second"] == pytest.approx(32 * flops_per_step)
  assert row["perf/input_wait_fraction"] == pytest.approx(0.5)
  assert "perf/mfu" not in row  # No known peak on CPU.
  # Stopped at 40 of 100 steps: no summary (it resumes), the same perf figures.
  assert not os.path.exists(tmp_path / "summary.json")
  summary = trainer.records[0].throughput.summary()
  assert summary["perf"]["flops_per_step"] == flops_per_step
  assert summary["perf"]["device_count"] == jax.device_count()
  assert summary["perf"]["peak_flops_per_second"] is None
  # Steps 1..20 (the first transfer's wait is the compilation's) and 21..40.
  assert summary["perf"]["steps_timed"] == 40
  assert summary["perf"]["seconds_timed"] == pytest.approx(20 / 64 + 4 / 16 + 0.625)


def test_mfu_against_the_peak_of_all_devices():
  monitor = throughput.ThroughputMonitor(
      batch_size=8, input_bound_threshold=0.2, device_kind="TPU v4", device_count=4)
  monitor.set_step_flops(1e12)
  row = monitor.interval(first_step=1, last_step=10, seconds=2.0, input_wait_seconds=0.0)
  assert row["perf/flops_per_second"] == pytest.approx(5e12)
  assert row["perf/mfu"] == pytest.approx(5e12 / 1100e12)
  assert row["perf/examples_per_second"] == pytest.approx(40.0)
  assert monitor.summary()["perf"]["mfu"] == pytest.approx(5e12 / 1100e12)


def test_input_wait_of_explicit_intervals(caplog):
  monitor = throughput.ThroughputMonitor(batch_size=10, input_bound_threshold=0.2)
  with caplog.at_level(logging.WARNING):
    rows = [monitor.interval(first_step=10 * i + 1, last_step=10 * (i + 1),
                             seconds=seconds, input_wait_seconds=wait)
            for i, (seconds, wait) in enumerate(
                [(2.0, 0.1), (2.0, 1.0), (1.0, 2.0), (2.0, 0.6), (4.0, 1.0)])]
  # The wait over the interval, at most all of it.
  assert [r["perf/input_wait_fraction"] for r in rows] == pytest.approx(
      [0.05, 0.5, 1.0, 0.3, 0.25])
  assert [r["perf/examples_per_second"] for r in rows] == pytest.approx(
      [50, 50, 100, 50, 25])
  # Over the threshold 4 times: warned at the 1st, 2nd and 4th.
  warnings = [r.getMessage() for r in caplog.records]
  assert len(warnings) == 3
  assert warnings[0].startswith("Input-bound: steps 11..20 waited 1s of 2s (50%)")
  assert warnings[1].startswith("Input-bound: steps 21..30 waited 2s of 1s (100%)")
  assert warnings[2].startswith("Input-bound: steps 41..50 waited 1s of 4s (25%)")
  assert monitor.summary() == {
      "perf": {"flops_per_step": None, "device_kind": "", "device_count": 1,
               "peak_flops_per_second": None, "steps_timed": 50,
               "seconds_timed": 11.0, "examples_per_second": pytest.approx(500 / 11)},
      "input_bound": {"flagged": True, "max_wait_fraction": 1.0,
                      "mean_wait_fraction": pytest.approx(0.42),
                      "wait_seconds": pytest.approx(4.7), "intervals": 5,
                      "intervals_over_threshold": 4, "threshold": 0.2}}


def test_one_slow_interval_does_not_flag_the_run():
  monitor = throughput.ThroughputMonitor(batch_size=10, input_bound_threshold=0.2)
  for i, wait in enumerate([1.0, 0.0, 0.0, 0.0]):
    monitor.interval(first_step=i + 1, last_step=i + 1, seconds=2.0,
                     input_wait_seconds=wait)
  bound = monitor.summary()["input_bound"]
  assert bound["intervals_over_threshold"] == 1
  assert bound["mean_wait_fraction"] == pytest.approx(0.125)
  assert not bound["flagged"]


def test_slow_input_is_flagged_with_the_figures(data_dir, tmp_path, caplog):
  config = mlp_config(data_dir, **{"data.batches_per_transfer": 1,
                                   "log_every_steps": 5, "max_train_steps": 20,
                                   "eval_every_steps": 5})
  trainer = _timed_trainer(config, str(tmp_path), step_seconds=0.01,
                           wait_seconds=0.04)
  with caplog.at_level(logging.WARNING):
    summary = trainer.run()[0]
  bound = summary["input_bound"]
  # Steps 1..5: 5 steps and 4 waits (the first transfer's is the
  # compilation's): 0.16 of 0.21 s. The next intervals: 5 of each, 0.2 of 0.25 s.
  assert bound == {"flagged": True, "threshold": 0.2, "intervals": 4,
                   "intervals_over_threshold": 4,
                   "max_wait_fraction": pytest.approx(0.8),
                   "mean_wait_fraction": pytest.approx((0.16 / 0.21 + 3 * 0.8) / 4),
                   "wait_seconds": pytest.approx(0.76)}
  rows = helpers.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["perf/input_wait_fraction"] for r in rows] == pytest.approx(
      [0.16 / 0.21, 0.8, 0.8, 0.8])
  warnings = [r.getMessage() for r in caplog.records if "Input-bound: steps" in r.getMessage()]
  assert len(warnings) == 3  # At the 1st, 2nd and 4th interval over.
  assert warnings[0].startswith("Input-bound: steps 1..5 waited 0.16s of 0.21s (76%)")
  assert "input_bound_warning_fraction=0.2" in warnings[0]
  assert helpers.read_json(str(tmp_path / "summary.json"))["input_bound"] == bound


def test_a_run_with_little_input_wait_is_not_flagged(data_dir, tmp_path, caplog):
  config = mlp_config(data_dir, **{"data.batches_per_transfer": 20,
                                   "eval_every_steps": 20})
  trainer = _timed_trainer(config, str(tmp_path), step_seconds=0.01,
                           wait_seconds=0.01)
  with caplog.at_level(logging.WARNING):
    summary = trainer.run()[0]
  bound = summary["input_bound"]
  # 20 steps of 0.01 s per interval, and from the second on one wait of 0.01 s.
  assert bound == {"flagged": False, "threshold": 0.2, "intervals": 5,
                   "intervals_over_threshold": 0,
                   "max_wait_fraction": pytest.approx(1 / 21),
                   "mean_wait_fraction": pytest.approx(4 / 21 / 5),
                   "wait_seconds": pytest.approx(0.04)}
  assert not [r for r in caplog.records if "Input-bound" in r.getMessage()]


@pytest.mark.parametrize("value,message", [
    ("3", "START:END"), ("a:b", "START:END"), ("1:2:3", "START:END"),
    ("0:2", "1 <= START"), ("5:3", "1 <= START"), ("3:41", "total_train_steps=40")])
def test_profile_steps_are_checked_before_compiling(value, message):
  config = helpers.load_config(profile_steps=value)
  with pytest.raises(config_schema.ConfigError, match="config.profile_steps") as e:
    config_validation.validate(config)
  assert message in str(e.value)


def test_profile_steps_accepts_a_range_within_the_run():
  config = helpers.load_config(profile_steps="3:40")
  config_validation.validate(config)
  assert config_schema.profile_step_range(config) == (3, 40)
  assert config_schema.profile_step_range(helpers.load_config()) is None


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5])
def test_input_bound_threshold_is_checked(value):
  config = helpers.load_config(input_bound_warning_fraction=value)
  with pytest.raises(config_schema.ConfigError,
                     match="config.input_bound_warning_fraction"):
    config_validation.validate(config)


def test_hand_count_is_the_three_passes():
  # 2 * (40*100 + 100*100 + 100*10) = 30,000 FLOPs forward per example;
  # 3 * 30,000 less the first layer's input gradient, 2 * 40*100.
  assert hand_count_flops(1) == 82_000
  assert hand_count_flops(BATCH) == 32_800_000
