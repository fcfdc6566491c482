"""Synthetic batches (no data set touched) and bfloat16 mixed precision."""

import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from tuning_playbook import batch_norm
from tuning_playbook.common import config_validation
from tuning_playbook import config_schema
from tuning_playbook.training import optimizers
from tuning_playbook.training import synthetic_data
from tuning_playbook.training import train
from tuning_playbook.training import train_step as train_step_lib
from tuning_playbook import workload as workload_lib

CONFIGS = os.path.join(helpers.REPO, "configs")
# The runs below train in this process, on its 4 simulated devices
# (tests/conftest.py), with no imports of their own to pay for: the CLI's
# synthetic runs are tests/test_shipped_configs_parallel.py's.
SYNTHETIC_RUN = {"data.synthetic": True, "max_train_steps": 6, "eval_every_steps": 3,
                 "log_every_steps": 1, "eval_batch_size": 16, "num_best_checkpoints": 3}
SYNTHETIC_RUNS = {  # name: overrides
    # k = 2 batches per transfer, so resuming at step 3 starts mid-transfer.
    "mnist1d_cnn": {"batch_size": 16, "data.batches_per_transfer": 2,
                    "model.batch_norm": True, "optimizer.warmup_steps": 2,
                    "optimizer.warmup_mode": "included"},
    "cifar10_wrn": {"batch_size": 8, "model.depth": 10, "model.width": 1,
                    "compute_dtype": "bfloat16"},
}
# The bfloat16-vs-float32 comparison: MNIST-1D CNN, 300 steps, seed 0. The
# peak learning rate is below the shipped 0.14, which sits at the edge of
# stability, where any perturbation of the trajectory (bfloat16 rounding
# included) occasionally sends a seed down another path.
TRACKING_RUN = {"max_train_steps": 300, "eval_every_steps": 300, "log_every_steps": 20,
                "optimizer.learning_rate": 0.05, "optimizer.warmup_steps": 30,
                "seed": 0}
# Measured over seeds 0-7 on 1 device: |error-rate difference| <= 0.009 (of
# 1000 validation examples), train-loss relative difference <= 0.024 at every
# log step; on the 4 devices here (compiled fast): <= 0.009 and <= 0.011.
# The bounds leave about 2x room.
MAX_VALIDATION_ERROR_DIFFERENCE = 0.02
MAX_TRAIN_LOSS_RELATIVE_DIFFERENCE = 0.05


def _train(workdir, config):
  """Trains (or resumes) `config` in this process; returns metrics.jsonl
  without the timing-dependent perf/* fields."""
  assert jax.device_count() == 4  # tests/conftest.py
  summary = train.train_and_evaluate(config, workdir)
  assert summary["status"] == "completed", summary
  return helpers.without_timing(helpers.read_jsonl(os.path.join(workdir, "metrics.jsonl")))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SYNTHETIC_RUNS))
def test_synthetic_run_trains_evaluates_and_resumes_without_data(tmp_path, name, caplog):
  data_dir = tmp_path / "tfds"
  workdir = str(tmp_path / "run")
  config = helpers.load_config(os.path.join(CONFIGS, f"{name}.py"), **{
      **SYNTHETIC_RUN, **SYNTHETIC_RUNS[name], "data.data_dir": str(data_dir)})
  rows = _train(workdir, config)

  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
  # Random labels of 10 classes: the loss starts near ln(10).
  assert abs(rows[0]["train/loss"] - np.log(10)) < 1.0
  for row in (rows[2], rows[5]):
    assert row["eval/validation/num_examples"] == 16
    assert row["eval/test/num_examples"] == 16
    assert 0 <= row["eval/validation/error_rate"] <= 1
  summary = helpers.read_json(os.path.join(workdir, "summary.json"))
  assert summary["status"] == "completed" and summary["final_step"] == 6
  checkpoints = os.path.join(workdir, "checkpoints")
  assert {"3", "6"} <= set(os.listdir(checkpoints))

  # As if killed right after the step-3 checkpoint: the resumed run trains
  # steps 4-6 on the same batches and logs the same values.
  os.remove(os.path.join(workdir, "summary.json"))
  shutil.rmtree(os.path.join(checkpoints, "6"))
  with caplog.at_level(logging.INFO):
    assert _train(workdir, config) == rows
  assert "Resumed from checkpoint at step 3." in caplog.text
  assert not data_dir.exists()


@pytest.mark.parametrize("override,expected", [
    ("--config.data.synthetic=True",
     "config.data.synthetic=True is invalid: workload 'tests.tiny_workload' "
     "defines no synthetic_spec(config)"),
    ("--config.compute_dtype=float16",
     "config.compute_dtype='float16' is invalid: allowed: float32, bfloat16, auto"),
])
def test_bad_synthetic_or_dtype_config_exits_2_naming_the_key(tmp_path, override, expected):
  workdir = str(tmp_path / "run")
  data_dir = tmp_path / "tfds"
  result = helpers.run_main(workdir, override, f"--config.data.data_dir={data_dir}")
  assert result.returncode == 2, result.stderr[-3000:]
  assert expected in result.stderr
  assert "Traceback" not in result.stderr
  assert not os.path.exists(workdir) and not data_dir.exists()


@pytest.mark.slow
def test_bfloat16_run_tracks_float32_run(tmp_path):
  # MNIST-1D from the session's TFDS directory (tests/conftest.py), prepared
  # there once for every test that trains on it.
  config = os.path.join(CONFIGS, "mnist1d_cnn.py")
  runs = {dtype: _train(str(tmp_path / dtype), helpers.load_config(config, **{
      **TRACKING_RUN, "data.data_dir": os.environ["TFDS_DATA_DIR"],
      "compute_dtype": dtype})) for dtype in ("float32", "bfloat16")}
  f32, bf16 = runs["float32"], runs["bfloat16"]
  assert [r["step"] for r in f32] == [r["step"] for r in bf16]
  relative = [abs(a["train/loss"] - b["train/loss"]) / a["train/loss"]
              for a, b in zip(f32, bf16)]
  assert max(relative) < MAX_TRAIN_LOSS_RELATIVE_DIFFERENCE, relative
  assert max(relative) > 0  # bfloat16 did change the computation.
  errors = [r[-1]["eval/validation/error_rate"] for r in (f32, bf16)]
  assert abs(errors[0] - errors[1]) < MAX_VALIDATION_ERROR_DIFFERENCE, errors
  assert max(errors) < 0.5  # Both learned: the comparison is not of two failures.


def _tiny_config(name, **overrides):
  return helpers.load_config(os.path.join(CONFIGS, f"{name}.py"), **overrides)


@pytest.mark.parametrize("name,overrides", [
    ("mnist1d_mlp", {}),
    ("mnist1d_cnn", {"model.batch_norm": True}),
    ("cifar10_wrn", {"model.depth": 10, "model.width": 1}),
])
def test_bfloat16_computes_in_bfloat16_and_keeps_state_float32(name, overrides):
  config = _tiny_config(name, compute_dtype="bfloat16", **overrides)
  workload = workload_lib.load_workload(config.workload)
  model = workload.create_model(config)
  spec = synthetic_data.workload_spec(config, workload)
  batch = {"inputs": jax.ShapeDtypeStruct((8,) + spec.inputs.shape, spec.inputs.dtype),
           "label": jax.ShapeDtypeStruct((8,) + spec.label.shape, spec.label.dtype)}
  tx = optimizers.create_optimizer(config.optimizer, config.max_train_steps)
  state = jax.eval_shape(lambda x: train_step_lib.create_train_state(model, tx, x, 0),
                         batch["inputs"])
  float_leaves = lambda tree: [x.dtype for x in jax.tree.leaves(tree)
                               if jnp.issubdtype(x.dtype, jnp.floating)]
  for part in (state.params, state.opt_state, state.batch_stats):
    assert set(float_leaves(part)) <= {jnp.dtype(jnp.float32)}
  assert float_leaves(state.params) and float_leaves(state.opt_state)

  # Every module's output (each layer's activations, the logits) is bfloat16.
  _, captured = jax.eval_shape(
      lambda s, x: model.apply(
          {"params": s.params, "batch_stats": s.batch_stats}, x, train=True,
          capture_intermediates=True, mutable=["intermediates", "batch_stats"],
          rngs={"dropout": jax.random.key(0)}), state, batch["inputs"])
  activations = float_leaves(captured["intermediates"])
  assert len(activations) > 3 and set(activations) == {jnp.dtype(jnp.bfloat16)}
  assert set(float_leaves(captured["batch_stats"])) <= {jnp.dtype(jnp.float32)}

  # The step's new state, gradients applied, and its loss stay float32.
  step = train_step_lib.make_train_step(model, tx, workload.loss_fn, 0.0)
  new_state, metrics = jax.eval_shape(step, state, batch)
  assert set(float_leaves(new_state)) == {jnp.dtype(jnp.float32)}
  assert metrics["train/loss"].dtype == jnp.float32


def test_float32_is_the_default_compute_dtype():
  config = _tiny_config("mnist1d_cnn")
  assert config.compute_dtype == "float32"
  assert workload_lib.compute_dtype(config) == jnp.float32
  model = workload_lib.load_workload(config.workload).create_model(config)
  logits = jax.eval_shape(lambda x: model.init_with_output(
      jax.random.key(0), x, train=False)[0], jax.ShapeDtypeStruct((2, 40), jnp.float32))
  assert logits.dtype == jnp.float32


def test_auto_compute_dtype_is_float32_on_cpu_and_bfloat16_elsewhere(monkeypatch):
  config = _tiny_config("mnist1d_cnn", compute_dtype="auto")
  config_validation.validate(config)
  assert jax.default_backend() == "cpu"
  assert workload_lib.compute_dtype(config) == jnp.float32
  for backend in ("gpu", "tpu"):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    assert workload_lib.compute_dtype(config) == jnp.bfloat16


def test_bad_compute_dtype_is_named_before_compiling():
  config = _tiny_config("mnist1d_cnn", compute_dtype="float16")
  with pytest.raises(config_schema.ConfigError, match=r"config\.compute_dtype='float16'"):
    config_validation.validate(config)
  with pytest.raises(config_schema.ConfigError, match=r"config\.compute_dtype='float16'"):
    workload_lib.compute_dtype(config)


@pytest.mark.parametrize("policy,virtual", [("global", 0), ("ghost", 16)])
def test_batch_norm_statistics_are_float32_for_bfloat16_inputs(policy, virtual):
  # Values near 100 with unit spread: a mean or variance accumulated in
  # bfloat16 (8 significant bits, spacing 0.5 here) would be far off.
  rng = np.random.default_rng(0)
  x = jnp.asarray(100 + rng.normal(size=(64, 5, 3)), jnp.bfloat16)
  layer = batch_norm.BatchNorm(policy=policy, virtual_batch_size=virtual, momentum=0.0)
  variables = layer.init(jax.random.key(0), x, train=True)
  y, updates = layer.apply(variables, x, train=True, mutable=["batch_stats"])
  stats = updates["batch_stats"]
  assert y.dtype == jnp.bfloat16
  assert stats["mean"].dtype == stats["var"].dtype == jnp.float32

  x64 = np.asarray(x, np.float64)
  groups = x64.reshape(64 // (virtual or 64), -1, 3)
  np.testing.assert_allclose(stats["mean"], groups.mean(axis=1).mean(0), rtol=1e-6)
  np.testing.assert_allclose(stats["var"], groups.var(axis=1).mean(0), rtol=1e-4)
  if policy == "global":
    expected = (x64 - x64.mean((0, 1))) / np.sqrt(x64.var((0, 1)) + layer.epsilon)
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, atol=0.02)

  evaluated = layer.apply({"params": variables["params"], "batch_stats": stats},
                          x, train=False)
  assert evaluated.dtype == jnp.bfloat16


def _spec(inputs, label, num_classes):
  return synthetic_data.SyntheticSpec(
      inputs=jax.ShapeDtypeStruct(*inputs), label=jax.ShapeDtypeStruct(*label),
      num_classes=num_classes)


def test_synthetic_stream_is_deterministic_and_resumable():
  spec = _spec(((40,), jnp.float32), ((), jnp.int32), 10)
  make = lambda seed=3, host=0: synthetic_data.SyntheticTrainStream(
      spec, seed=seed, local_batch_size=4, process_index=host, process_count=2)
  stream = make()
  assert stream.element_spec() == ((40,), np.float32)
  assert stream.layout == [stream.num_batches * 4] * 2
  first = [b for _, b in zip(range(10), stream.iterate(0))]
  resumed = [b for _, b in zip(range(5), make().iterate(5))]
  for a, b in zip(first[5:], resumed):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert first[0]["inputs"].shape == (4, 40) and first[0]["inputs"].dtype == np.float32
  assert first[0]["label"].shape == (4,) and first[0]["label"].dtype == np.int32
  assert not np.array_equal(first[0]["inputs"], first[1]["inputs"])
  for other in (make(seed=4), make(host=1)):  # Another seed, another host's share.
    assert not np.array_equal(next(other.iterate(0))["inputs"], first[0]["inputs"])
  position = stream.position(stream.num_batches + 1)
  assert (position.epoch, position.offset_in_epoch) == (1, 4)


def test_synthetic_language_model_batches_and_eval_splits():
  spec = _spec(((12,), jnp.int32), ((12,), jnp.int32), 258)
  batch = next(synthetic_data.SyntheticTrainStream(
      spec, seed=0, local_batch_size=64, process_index=0, process_count=1).iterate(0))
  for key in ("inputs", "label"):
    assert batch[key].shape == (64, 12) and batch[key].dtype == np.int32
    assert batch[key].min() >= 0 and batch[key].max() < 258
  assert len(np.unique(batch["label"])) > 200  # Uniform over the vocabulary.

  splits = synthetic_data.make_eval_splits(
      spec, local_batch_size=8, process_index=1, process_count=2)
  assert [s.name for s in splits] == ["validation", "train", "test"]
  for split in splits:
    (only,) = list(split.batches())
    assert split.total_examples == 16 and split.num_batches == 1
    assert only["inputs"].shape == (8, 12)
    np.testing.assert_array_equal(only["weight"], np.ones(8, np.float32))


def test_malformed_synthetic_spec_is_a_workload_defect():
  workload = workload_lib.load_workload("mnist1d_cnn")
  config = _tiny_config("mnist1d_cnn")
  bad = {"inputs": jax.ShapeDtypeStruct((40,), jnp.float32),
         "label": jax.ShapeDtypeStruct((), jnp.float32), "num_classes": 10}
  broken = workload.__class__(**{**workload.__dict__, "synthetic_spec": lambda c: bad})
  with pytest.raises(TypeError, match=r"\['label'\] must have an integer dtype"):
    synthetic_data.workload_spec(config, broken)
