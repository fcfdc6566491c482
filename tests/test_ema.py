"""Polyak averaging (`config.ema_decay`): the average, its evals, its checkpoints.

The arithmetic is checked against an average computed here from the raw
parameters; the rest runs `configs/mnist1d_cnn.py` for a few steps in real
processes on 2 simulated devices, killed and resumed.
"""

import os
import signal
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import helpers
from tests import tiny_workload
from tuning_playbook.analysis import study_data
from tuning_playbook.analysis import trial_data
from tuning_playbook.common import config_validation
from tuning_playbook import config_schema
from tuning_playbook.training import optimizers
from tuning_playbook.training import train_step as train_step_lib
from tuning_playbook import workload as workload_lib

CNN_CONFIG = os.path.join(helpers.REPO, "configs", "mnist1d_cnn.py")
EMA_METRIC = "eval_ema/validation/error_rate"
RUN_FLAGS = ("--config.ema_decay=0.9", f"--config.best_metric={EMA_METRIC}",
             "--config.max_train_steps=100", "--config.eval_every_steps=20",
             "--config.log_every_steps=10", "--config.optimizer.warmup_steps=10",
             "--config.data.batches_per_transfer=10",
             "--config.num_best_checkpoints=2")


def _tree_leaves_np(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def test_ema_params_equal_an_independent_average_of_the_raw_params():
  config = helpers.load_config(**{"model.dropout_rate": 0.0})
  model = tiny_workload.create_model(config)
  tx = optimizers.create_optimizer(config.optimizer, config.max_train_steps)
  sample = np.zeros((1, tiny_workload.NUM_FEATURES), np.float32)
  decay = 0.8
  state = jax.jit(lambda: train_step_lib.create_train_state(
      model, tx, sample, config.seed, ema=True))()
  # The trainer's way: jitted once, state donated.
  loss_fn = workload_lib.load_workload(config.workload).loss_fn
  step = jax.jit(train_step_lib.make_train_step(
      model, tx, loss_fn, 0.0, ema_decay=decay), donate_argnums=0)
  x, y = tiny_workload.make_split("train")
  expected = _tree_leaves_np(state.params)
  assert [a.dtype for a in jax.tree.leaves(state.ema_params)] == [np.float32] * len(expected)
  for got, want in zip(_tree_leaves_np(state.ema_params), expected):
    np.testing.assert_array_equal(got, want)
  for t in range(1, 26):
    rows = slice((t - 1) * 8 % 200, (t - 1) * 8 % 200 + 8)
    state, _ = step(state, {"inputs": x[rows], "label": y[rows]})
    d = min(decay, (1 + t) / (10 + t))
    expected = [d * e + (1 - d) * p for e, p in zip(expected, _tree_leaves_np(state.params))]
  assert int(state.step) == 25
  for got, want in zip(_tree_leaves_np(state.ema_params), expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The average has moved away from the raw parameters (decay 0.8 is reached).
  raw = _tree_leaves_np(state.params)
  assert any(np.max(np.abs(a - b)) > 1e-4 for a, b in zip(raw, expected))
  averaged = train_step_lib.ema_state(state)
  for got, want in zip(_tree_leaves_np(averaged.params), expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert averaged.batch_stats is state.batch_stats


def test_without_ema_the_state_holds_no_average():
  config = helpers.load_config()
  model = tiny_workload.create_model(config)
  tx = optimizers.create_optimizer(config.optimizer, config.max_train_steps)
  state = jax.eval_shape(lambda: train_step_lib.create_train_state(
      model, tx, np.zeros((1, tiny_workload.NUM_FEATURES), np.float32), 0))
  assert state.ema_params == {}
  with pytest.raises(ValueError, match="ema_decay"):
    train_step_lib.ema_state(state)


@pytest.mark.parametrize("overrides,message", [
    ({"ema_decay": 1.0}, "config.ema_decay=1.0 is invalid"),
    ({"ema_decay": -0.1}, "config.ema_decay=-0.1 is invalid"),
    ({"best_metric": "eval_ema/validation/loss"},
     "config.best_metric='eval_ema/validation/loss' is invalid: eval_ema/... "
     "metrics need config.ema_decay > 0"),
    ({"best_metric": "ema/validation/loss", "ema_decay": 0.9},
     "config.best_metric='ema/validation/loss' is invalid"),
])
def test_bad_ema_configs_name_the_key(overrides, message):
  with pytest.raises(config_schema.ConfigError) as e:
    config_validation.validate(helpers.load_config(**overrides))
  assert message in str(e.value)


def test_an_ema_metric_without_ema_exits_2_before_compiling(tmp_path):
  workdir = str(tmp_path / "run")
  result = helpers.run_main(workdir, f"--config.best_metric={EMA_METRIC}")
  assert result.returncode == 2, result.stderr[-3000:]
  assert "config.best_metric" in result.stderr and "config.ema_decay" in result.stderr
  assert not os.path.exists(workdir)


@pytest.fixture(scope="module")
def data_flag():
  # The session's TFDS directory (tests/conftest.py): MNIST-1D, built once.
  return f"--config.data.data_dir={os.environ['TFDS_DATA_DIR']}"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_flag):
  workdir = str(tmp_path_factory.mktemp("reference"))
  result = helpers.run_main(workdir, data_flag, *RUN_FLAGS, num_devices=2,
                            config=CNN_CONFIG)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_evals_score_the_average_and_best_metric_may_pick_it(reference_run):
  rows = helpers.read_jsonl(os.path.join(reference_run, "metrics.jsonl"))
  evals = [r for r in rows if "eval/validation/loss" in r]
  assert len(evals) >= 5
  for row in evals:
    for split in config_schema.EVAL_SPLITS:
      for metric in config_schema.EVAL_METRICS:
        assert f"eval_ema/{split}/{metric}" in row
      assert (row[f"eval_ema/{split}/num_examples"]
              == row[f"eval/{split}/num_examples"])
  # Averaging changes what is measured (decay 0.9: about the last 10 steps).
  assert any(r["eval_ema/validation/loss"] != r["eval/validation/loss"] for r in evals)
  assert not any("eval_ema/" in k for r in rows if r not in evals for k in r)

  summary = helpers.read_json(os.path.join(reference_run, "summary.json"))
  best = min(evals, key=lambda r: (r[EMA_METRIC], r["step"]))
  assert summary["best_metric"] == EMA_METRIC
  assert (summary["best_step"], summary["best_value"]) == (best["step"], best[EMA_METRIC])

  # The analysis ranks the trial by the same value.
  trial = trial_data.load_trial(reference_run, "0", {})
  assert trial.feasible and trial.best_value == best[EMA_METRIC]
  steps, values = trial.series(EMA_METRIC)
  assert list(steps) == [r["step"] for r in evals]
  objective = study_data.Objective(EMA_METRIC, "min")
  assert objective.split_metric == ("validation", "error_rate")
  assert objective.on_split("train") == "eval_ema/train/error_rate"


def test_checkpoints_hold_the_average_beside_the_raw_params(reference_run):
  final = helpers.read_json(os.path.join(reference_run, "summary.json"))["final_step"]
  state = ocp.StandardCheckpointer().restore(
      os.path.join(reference_run, "checkpoints", str(final), "state"))
  assert (jax.tree.structure(state["ema_params"])
          == jax.tree.structure(state["params"]))
  ema, raw = jax.tree.leaves(state["ema_params"]), jax.tree.leaves(state["params"])
  assert all(np.asarray(e).dtype == np.float32 for e in ema)
  assert all(np.asarray(e).shape == np.asarray(p).shape for e, p in zip(ema, raw))
  assert any(not np.array_equal(e, p) for e, p in zip(ema, raw))


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(reference_run, data_flag, tmp_path):
  workdir = str(tmp_path / "killed")
  proc = subprocess.Popen(
      helpers.main_command(workdir, data_flag, *RUN_FLAGS, config=CNN_CONFIG),
      cwd=helpers.REPO, env=helpers.subprocess_env(2), stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  checkpoint = os.path.join(workdir, "checkpoints", "40")
  deadline = time.time() + 240
  while proc.poll() is None and not os.path.isdir(checkpoint) and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  rows_before = helpers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  result = helpers.run_main(workdir, data_flag, *RUN_FLAGS, num_devices=2,
                            config=CNN_CONFIG)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed from checkpoint at step" in result.stderr
  rows = helpers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  ref_rows = helpers.read_jsonl(os.path.join(reference_run, "metrics.jsonl"))
  assert len(rows_before) < len(ref_rows)
  assert helpers.without_timing(rows) == helpers.without_timing(ref_rows)
  summary = helpers.read_json(os.path.join(workdir, "summary.json"))
  ref_summary = helpers.read_json(os.path.join(reference_run, "summary.json"))
  for key in ("status", "best_step", "best_value", "final_step"):
    assert summary[key] == ref_summary[key]
