"""End-to-end training on the tiny workload, in process, over 4 CPU devices."""

import glob
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util
import tensorflow_datasets as tfds

from tests import helpers
from tests import tiny_workload
from tuning_playbook.common import termination
from tuning_playbook import config_schema
from tuning_playbook.training import in_memory_stream
from tuning_playbook.training import preemption
from tuning_playbook.training import train


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


class _CompileCounter(logging.Handler):

  def __init__(self):
    super().__init__()
    self.names = []

  def emit(self, record):
    message = record.getMessage()
    if message.startswith("Compiling jit("):
      self.names.append(message[len("Compiling jit("):].split(")")[0])


@pytest.fixture(scope="module")
def completed_run(tmp_path_factory, data_dir):
  """A finished run, with every compilation it made recorded."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = helpers.load_config(**{"data.data_dir": data_dir, "eval_batch_size": 24,
                                  "model.dropout_rate": 0.0})
  counter = _CompileCounter()
  logger = logging.getLogger("jax._src.interpreters.pxla")
  logger.addHandler(counter)
  jax.config.update("jax_log_compiles", True)
  try:
    summary = train.train_and_evaluate(config, workdir)
  finally:
    jax.config.update("jax_log_compiles", False)
    logger.removeHandler(counter)
  return config, workdir, summary, counter.names


def _restore_params(path):
  restored = ocp.StandardCheckpointer().restore(os.path.join(path, "state"))
  return restored["params"]["Dense_0"]


def _numpy_metrics(params, x, y):
  logits = (x.astype(np.float64) @ np.asarray(params["kernel"], np.float64)
            + np.asarray(params["bias"], np.float64))
  logits = logits - logits.max(axis=1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  loss = -log_probs[np.arange(len(y)), y].mean()
  correct = int((logits.argmax(axis=1) == y).sum())
  return loss, correct


def test_records_and_summary(completed_run):
  config, workdir, summary, _ = completed_run
  assert summary["status"] == "completed"
  assert summary["final_step"] == config_schema.total_train_steps(config) == 40
  assert summary["total_train_steps"] == 40
  assert summary["max_train_steps"] == config.max_train_steps == 35
  assert helpers.read_json(os.path.join(workdir, "summary.json")) == summary
  rows = helpers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  steps = [r["step"] for r in rows]
  assert steps == sorted(set(steps))
  assert steps == list(range(5, 41, 5))
  eval_rows = [r for r in rows if "eval/validation/error_rate" in r]
  assert [r["step"] for r in eval_rows] == [10, 20, 30, 40]
  for key in ("train/loss", "train/grad_norm", "train/learning_rate",
              "train/clipped_fraction"):
    assert all(key in r for r in rows)
  best = min(eval_rows, key=lambda r: (r["eval/validation/error_rate"], r["step"]))
  assert summary["best_step"] == best["step"]
  assert summary["best_value"] == best["eval/validation/error_rate"]
  assert summary["best_checkpoint"].endswith(f"checkpoints/{best['step']}")
  assert len(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))) == 1
  board = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
  board.Reload()
  for key in ("train/loss", "eval/validation/error_rate"):
    logged = [(r["step"], r[key]) for r in rows if key in r]
    assert [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
            for e in board.Tensors(key)] == [
                (step, pytest.approx(value, rel=1e-6)) for step, value in logged]
  assert helpers.read_json(os.path.join(workdir, "config.json"))["batch_size"] == 16
  grad_rows = helpers.read_jsonl(os.path.join(workdir, "grad_norms.jsonl"))
  assert [r["step"] for r in grad_rows] == list(range(1, 41))
  first_window = np.mean([r["train/grad_norm"] for r in grad_rows[:5]])
  assert rows[0]["train/grad_norm"] == pytest.approx(first_window, rel=1e-6)


def test_one_compilation_for_train_and_one_for_eval(completed_run):
  _, _, _, compiled = completed_run
  # 61 validation, 61 train-subset and 47 test examples over batches of 24:
  # padded remainders must reuse the same eval compilation.
  assert compiled.count("step_in_loop") == 1
  assert compiled.count("eval_step") == 1


def test_examples_on_the_devices_train_as_gathered_on_the_host(
    completed_run, data_dir, tmp_path, caplog):
  config, workdir, _, _ = completed_run
  assert config.data.on_device_max_mb > 0  # The run gathered on the devices.
  host_config = helpers.load_config(**{
      "data.data_dir": data_dir, "eval_batch_size": 24, "model.dropout_rate": 0.0,
      "data.on_device_max_mb": 0})
  with caplog.at_level(logging.INFO):
    train.train_and_evaluate(host_config, str(tmp_path))
  assert "Training batches are gathered on the host." in caplog.text
  for records in ("grad_norms.jsonl", "metrics.jsonl"):
    on_devices = helpers.read_jsonl(os.path.join(workdir, records))
    on_host = helpers.read_jsonl(str(tmp_path / records))
    assert len(on_devices) == len(on_host) > 1
    for a, b in zip(on_devices, on_host):
      assert {k: v for k, v in a.items() if not k.startswith("perf/")} == {
          k: v for k, v in b.items() if not k.startswith("perf/")}


def test_eval_metrics_equal_exact_full_split(completed_run, data_dir):
  config, workdir, summary, _ = completed_run
  rows = {r["step"]: r for r in helpers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))}
  for step in (summary["best_step"], config_schema.total_train_steps(config)):
    params = _restore_params(os.path.join(workdir, "checkpoints", str(step)))
    builder = tiny_workload.dataset_builder(config)
    train_order = [int(ex["index"]) for ex in tfds.as_numpy(
        builder.as_dataset(split="train", shuffle_files=False).take(61))]
    for name in ("validation", "test", "train"):
      x, y = tiny_workload.make_split(name)
      if name == "train":
        x, y = x[train_order], y[train_order]
      loss, correct = _numpy_metrics(params, x, y)
      row = rows[step]
      assert row[f"eval/{name}/num_examples"] == len(y)
      assert row[f"eval/{name}/num_correct"] == correct
      assert row[f"eval/{name}/error_rate"] == pytest.approx(1 - correct / len(y), abs=1e-12)
      assert row[f"eval/{name}/loss"] == pytest.approx(loss, rel=1e-5)


def test_best_n_and_latest_checkpoints_kept(completed_run):
  config, workdir, summary, _ = completed_run
  rows = [r for r in helpers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if "eval/validation/error_rate" in r]
  ranked = sorted(rows, key=lambda r: (r["eval/validation/error_rate"], r["step"]))
  best_steps = {r["step"] for r in ranked[:config.num_best_checkpoints]}
  kept = {int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()}
  assert summary["best_step"] in kept
  last = config_schema.total_train_steps(config)
  assert last in kept
  assert kept == best_steps | {last}


def test_first_step_grad_norm_matches_numpy(data_dir, tmp_path):
  config = helpers.load_config(**{
      "data.data_dir": data_dir, "max_train_steps": 1, "eval_every_steps": 1,
      "log_every_steps": 1, "model.dropout_rate": 0.0, "optimizer.warmup_steps": 0})
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["status"] == "completed"
  builder = tiny_workload.dataset_builder(config)
  stream = in_memory_stream.InMemoryTrainStream(
      builder, "train", input_key="x", label_key="y", seed=config.seed,
      local_batch_size=16, process_index=0, process_count=1)
  batch = next(stream.iterate(0))
  # Initial parameters: re-create them exactly as training does.
  from tuning_playbook.training import optimizers, train_step  # pylint: disable=g-import-not-at-top
  model = tiny_workload.create_model(config)
  tx = optimizers.create_optimizer(config.optimizer, config.max_train_steps)
  state = train_step.create_train_state(model, tx, np.zeros((1, 6), np.float32), config.seed)
  w = np.asarray(state.params["Dense_0"]["kernel"], np.float64)
  b = np.asarray(state.params["Dense_0"]["bias"], np.float64)
  x, y = batch["inputs"].astype(np.float64), batch["label"]
  logits = x @ w + b
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  d = p.copy()
  d[np.arange(16), y] -= 1
  d /= 16
  expected = np.sqrt(np.sum((x.T @ d) ** 2) + np.sum(d.sum(0) ** 2))
  row = helpers.read_jsonl(str(tmp_path / "grad_norms.jsonl"))[0]
  assert row["step"] == 1
  assert row["train/grad_norm"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("clip,fraction", [(1e-4, 1.0), (1e4, 0.0)])
def test_gradient_clipping_fraction(data_dir, tmp_path, clip, fraction):
  config = helpers.load_config(**{
      "data.data_dir": data_dir, "max_train_steps": 5, "eval_every_steps": 10,
      "grad_clip_norm": clip})  # 10 steps with the 5 of warmup.
  train.train_and_evaluate(config, str(tmp_path))
  rows = helpers.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["train/clipped_fraction"] for r in rows] == [fraction, fraction]
  # The logged norm is the unclipped one.
  assert all(r["train/grad_norm"] > 10 * clip for r in rows) == (fraction == 1.0)


def test_clipping_bounds_the_update(data_dir, tmp_path):
  config = helpers.load_config(**{
      "data.data_dir": data_dir, "max_train_steps": 1, "eval_every_steps": 1,
      "grad_clip_norm": 1e-3, "optimizer.name": "sgd", "optimizer.warmup_steps": 0,
      "optimizer.schedule": "constant", "optimizer.learning_rate": 1.0,
      "model.dropout_rate": 0.0})
  train.train_and_evaluate(config, str(tmp_path))
  from tuning_playbook.training import optimizers, train_step  # pylint: disable=g-import-not-at-top
  model = tiny_workload.create_model(config)
  tx = optimizers.create_optimizer(config.optimizer, 1)
  init = train_step.create_train_state(model, tx, np.zeros((1, 6), np.float32), config.seed)
  after = _restore_params(str(tmp_path / "checkpoints" / "1"))
  delta = np.sqrt(sum(np.sum((np.asarray(after[k]) - np.asarray(init.params["Dense_0"][k])) ** 2)
                      for k in ("kernel", "bias")))
  assert delta == pytest.approx(1e-3, rel=1e-4)


def test_divergence_stops_early_with_status(data_dir, tmp_path):
  config = helpers.load_config(**{
      "data.data_dir": data_dir, "optimizer.name": "sgd",
      "optimizer.learning_rate": 1e30, "optimizer.warmup_steps": 0})
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["status"] == "diverged"
  assert summary["final_step"] < config.max_train_steps
  assert "train/loss" in summary["reason"]
  assert helpers.read_json(str(tmp_path / "summary.json"))["status"] == "diverged"


def test_loss_bound_marks_divergence(data_dir, tmp_path):
  config = helpers.load_config(**{
      "data.data_dir": data_dir, "divergence_loss_threshold": 1e-3})
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["status"] == "diverged"
  assert summary["final_step"] == config.log_every_steps
  assert "divergence_loss_threshold=0.001" in summary["reason"]


def test_a_stop_between_log_steps_resumes_the_steps_not_yet_logged(
    completed_run, monkeypatch, tmp_path):
  """Stopped at step 13 (logs at 5, 10, 15): the checkpoint of the stop holds
  steps 11..13, and the resumed run records them as the uninterrupted run did.
  (The stop is planted; tests/test_resume.py stops real runs with SIGTERM.)"""
  config, reference, ref_summary, _ = completed_run
  workdir = str(tmp_path / "stopped")
  with monkeypatch.context() as patch:
    patch.setattr(preemption.StopStep, "reached", lambda self, step: step == 13)
    with pytest.raises(termination.Preempted) as stopped:
      train.train_and_evaluate(config, workdir)
  assert stopped.value.step == 13 and stopped.value.code == 143
  assert [r["step"] for r in helpers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          ] == [5, 10]
  meta = helpers.read_json(os.path.join(workdir, "checkpoints", "13", "meta",
                                        "metadata"))
  assert meta["open_interval"]["first"] == 11
  assert len(meta["open_interval"]["fetched"]) == 3
  summary = train.train_and_evaluate(config, workdir)
  for name in ("metrics.jsonl", "grad_norms.jsonl"):
    assert helpers.without_timing(helpers.read_jsonl(os.path.join(workdir, name))) == (
        helpers.without_timing(helpers.read_jsonl(os.path.join(reference, name)))), name
  assert summary["best_value"] == ref_summary["best_value"]
  assert "13" not in os.listdir(os.path.join(workdir, "checkpoints"))
