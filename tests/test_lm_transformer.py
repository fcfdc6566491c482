"""The LM1B byte-level Transformer: tokenizer, masked per-token loss and
accuracy, causality, and training with eval, checkpoint and resume on mock
LM1B."""

import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from tests import helpers
from tuning_playbook.common import config_validation
from tuning_playbook import config_schema
from tuning_playbook.training import evaluation
from tuning_playbook.training import optimizers
from tuning_playbook.training import sharding
from tuning_playbook.training import train
from tuning_playbook.training import train_step as train_step_lib
from tuning_playbook import workload as workload_lib
from workloads import lm_transformer

CONFIG = os.path.join(helpers.REPO, "configs", "lm_transformer.py")
TINY_MODEL = {"model.num_layers": 2, "model.emb_dim": 16, "model.num_heads": 2,
              "model.mlp_dim": 32, "model.max_len": 12, "data.max_length": 12}


def tiny_config(**overrides):
  return helpers.load_config(CONFIG, **{**TINY_MODEL, **overrides})


@pytest.mark.parametrize("text,length,inputs,label", [
    ("Hi", 6, [1, 74, 107, 0, 0, 0], [74, 107, 1, 0, 0, 0]),
    # "é€" is 5 UTF-8 bytes: c3 a9 e2 82 ac.
    ("é€", 8, [1, 197, 171, 228, 132, 174, 0, 0], [197, 171, 228, 132, 174, 1, 0, 0]),
    ("", 4, [1, 0, 0, 0], [1, 0, 0, 0]),
    ("abc", 4, [1, 99, 100, 101], [99, 100, 101, 1]),  # The end mark just fits.
    ("abcdef", 4, [1, 99, 100, 101], [99, 100, 101, 102]),  # Cut: no end mark.
])
def test_byte_tokenizer_exact_ids(text, length, inputs, label):
  config = tiny_config(**{"data.max_length": length})
  workload = workload_lib.load_workload("lm_transformer", config)
  out = workload.preprocess({"text": tf.constant(text)}, train=True,
                            seed=tf.constant([3, 4], tf.int64))
  for key, expected in (("inputs", inputs), ("label", label)):
    assert out[key].dtype == tf.int32 and out[key].shape == (length,)
    np.testing.assert_array_equal(out[key], expected)
  np.testing.assert_array_equal(lm_transformer.weights_fn(jnp.asarray(label)),
                                np.asarray(label) != 0)


def test_config_validates_and_bad_lengths_name_the_key():
  config = helpers.load_config(CONFIG)
  config_validation.validate(config)
  lm_transformer.create_model(config)
  spec = lm_transformer.synthetic_spec(config)
  assert spec["inputs"].shape == spec["label"].shape == (128,)
  assert spec["num_classes"] == lm_transformer.VOCAB_SIZE == 258
  with pytest.raises(workload_lib.ModelConfigError, match=r"config\.data\.max_length=13"):
    lm_transformer.create_model(tiny_config(**{"data.max_length": 13}))
  with pytest.raises(workload_lib.ModelConfigError, match=r"config\.model\.emb_dim=15"):
    lm_transformer.create_model(tiny_config(**{"model.emb_dim": 15}))


# Four sequences of 5 targets, 5, 3, 2 and 1 of them real (0 pads).
LABELS = np.array([[3, 4, 5, 6, 1], [2, 3, 1, 0, 0], [4, 1, 0, 0, 0],
                   [1, 0, 0, 0, 0]], np.int32)
VOCAB = 7


class FixedLogits:
  """A fake model: the logits are its inputs plus a learned bias."""

  def apply(self, variables, inputs, train, rngs=None, mutable=()):  # pylint: disable=unused-argument
    logits = inputs + variables["params"]["bias"]
    return (logits, {}) if mutable else logits


def _state(tx):
  params = {"bias": jnp.zeros((VOCAB,), jnp.float32)}
  return train_step_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
      opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(0)))


def _nll(logits):
  log_p = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
  return -np.take_along_axis(log_p, LABELS[..., None], -1)[..., 0]


def _hand_metrics(logits, row_weight):
  """(loss, accuracy, number) over the real targets of rows of weight 1."""
  nll = _nll(logits)
  w = (LABELS != 0) * row_weight[:, None]
  correct = np.argmax(logits, -1) == LABELS
  return np.sum(nll * w) / np.sum(w), np.sum(correct * w) / np.sum(w), np.sum(w)


def _run_steps(logits, row_weight, num_devices):
  """(train loss, eval metrics) of the framework's steps on `num_devices`."""
  mesh = Mesh(np.asarray(jax.devices()[:num_devices]).reshape(num_devices, 1),
              (sharding.DATA_AXIS, sharding.FSDP_AXIS))
  replicated, batched = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  workload = workload_lib.load_workload("lm_transformer")
  tx = optimizers.create_optimizer(config_schema.base_config().optimizer, 10)
  train_step = jax.jit(train_step_lib.make_train_step(
      FixedLogits(), tx, workload.loss_fn, 0.0, workload.weights_fn),
                       in_shardings=(replicated, batched))
  eval_step = jax.jit(train_step_lib.make_eval_step(
      FixedLogits(), workload.loss_fn, workload.correct_fn, workload.weights_fn),
                      in_shardings=(replicated, batched))
  batch = {"inputs": jnp.asarray(logits), "label": jnp.asarray(LABELS)}
  state = _state(tx)
  _, metrics = train_step(state, batch)
  sums = jax.device_get(eval_step(state, {**batch, "weight": jnp.asarray(row_weight)}))
  return float(metrics["train/loss"]), evaluation.metrics_from_sums(
      "validation", **{k: float(v) for k, v in sums.items()})


def test_masked_loss_and_accuracy_equal_hand_computation_on_1_and_4_devices():
  logits = np.random.default_rng(0).normal(size=LABELS.shape + (VOCAB,)).astype(np.float32)
  row_weight = np.array([1, 1, 1, 0], np.float32)  # The last row is eval padding.
  # Anything at padding (targets 0, or rows of weight 0) must not count.
  garbage = logits.copy()
  garbage[LABELS == 0] = 1e4 * np.random.default_rng(1).normal(size=(VOCAB,))
  garbage[3] = np.nan
  train_loss, _, _ = _hand_metrics(logits, np.ones(4))
  eval_loss, eval_accuracy, num_targets = _hand_metrics(logits, row_weight)
  assert num_targets == 10
  results = {}
  for num_devices in (1, 4):
    results[num_devices] = _run_steps(logits, row_weight, num_devices)
    loss, metrics = results[num_devices]
    assert loss == pytest.approx(train_loss, rel=1e-6)
    assert metrics["eval/validation/loss"] == pytest.approx(eval_loss, rel=1e-6)
    assert metrics["eval/validation/accuracy"] == pytest.approx(eval_accuracy, abs=1e-12)
    assert metrics["eval/validation/num_targets"] == num_targets
    assert metrics["eval/validation/num_examples"] == 3
    _, padded = _run_steps(garbage, row_weight, num_devices)
    assert padded == metrics
  garbage[3] = logits[3]  # Training has no padding rows.
  assert _run_steps(garbage, row_weight, 4)[0] == results[4][0]
  assert results[1][0] == pytest.approx(results[4][0], rel=1e-6)
  # A mean of the 4 devices' own masked means (one sequence each) differs.
  per_device = [np.mean(nll[labels != 0]) for nll, labels in zip(_nll(logits), LABELS)]
  assert abs(np.mean(per_device) - train_loss) > 1e-2


def _tokens():
  """Two random sequences of 12 byte tokens (ids 2..257)."""
  return jnp.asarray(np.random.default_rng(0).integers(2, 258, (2, 12)), jnp.int32)


@pytest.mark.parametrize("position_embedding", ["learned", "sinusoidal"])
@pytest.mark.parametrize("tied_embedding", [True, False])
def test_causality_a_future_token_leaves_earlier_logits_alone(
    position_embedding, tied_embedding):
  model = lm_transformer.create_model(tiny_config(**{
      "model.position_embedding": position_embedding,
      "model.tied_embedding": tied_embedding}))
  tokens = _tokens()
  variables = jax.jit(lambda: model.init(
      jax.random.key(1), tokens, train=False))()
  apply = jax.jit(lambda x: model.apply(variables, x, train=False))
  logits = apply(tokens)
  assert logits.shape == (2, 12, 258) and logits.dtype == jnp.float32
  for t in (0, 5, 11):
    changed = apply(tokens.at[:, t].set((tokens[:, t] + 1) % 256 + 2))
    np.testing.assert_allclose(changed[:, :t], logits[:, :t], rtol=0, atol=1e-6)
    assert not np.allclose(changed[:, t], logits[:, t], atol=1e-3)


def test_bfloat16_compute_keeps_float32_parameters_and_logits():
  tokens = _tokens()
  models = {d: lm_transformer.create_model(tiny_config(compute_dtype=d))
            for d in ("float32", "bfloat16")}
  variables = jax.jit(lambda: models["bfloat16"].init(
      jax.random.key(1), tokens, train=False))()
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  logits = jax.jit(lambda v: {d: m.apply(v, tokens, train=False)
                              for d, m in models.items()})(variables)
  assert logits["bfloat16"].dtype == jnp.float32
  np.testing.assert_allclose(logits["bfloat16"], logits["float32"], atol=0.15)


def _write_mock_metadata(data_dir, num_examples):
  """Split sizes for mock LM1B (the mock yields `num_examples` per split)."""
  builder = tfds.builder("lm1b", data_dir=data_dir)
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=name, shard_lengths=[num_examples], num_bytes=0)
      for name in ("train", "test")]))
  os.makedirs(builder.data_dir)
  builder.info.write_to_directory(builder.data_dir)


@pytest.mark.slow
def test_train_eval_checkpoint_and_resume_on_mock_lm1b(tmp_path, monkeypatch, caplog):
  num_examples, length = 10, 16
  data_dir = str(tmp_path / "data")
  _write_mock_metadata(data_dir, num_examples)
  # The mock ignores slicing: each role reads a whole split.
  monkeypatch.setattr(lm_transformer, "SPLITS",
                      {"train": "train", "validation": "test", "test": "test"})
  config = helpers.load_config(CONFIG, **{
      "model.num_layers": 1, "model.emb_dim": 16, "model.num_heads": 2,
      "model.mlp_dim": 32, "model.max_len": length, "data.max_length": length,
      "data.data_dir": data_dir, "data.shuffle_buffer": 16, "batch_size": 8,
      "eval_batch_size": 8, "max_train_steps": 3, "eval_every_steps": 2,
      "log_every_steps": 2, "optimizer.warmup_steps": 1,  # 4 steps in all.
      "step_watchdog_seconds": 0.0})
  workdir = str(tmp_path / "run")
  with tfds.testing.mock_data(num_examples=num_examples, data_dir=data_dir,
                              policy=tfds.testing.MockPolicy.USE_FILES):
    texts = [ex["text"] for ex in tfds.as_numpy(
        tfds.builder("lm1b", data_dir=data_dir).as_dataset(split="test"))]
    # Interrupted after the eval and checkpoint at step 2, then resumed.
    trainer = train.Trainer([config], [workdir], [train.validate_before_compiling(config)])
    assert trainer.train(2) == [None]
    trainer.records[0].ckpt.wait()
    trainer.records[0].ckpt.close()
    with caplog.at_level(logging.INFO):
      summary = train.train_and_evaluate(config, workdir)
  assert "Resumed from checkpoint at step 2." in caplog.text
  assert summary["status"] == "completed" and summary["final_step"] == 4
  rows = helpers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [2, 4]
  num_targets = sum(min(len(t) + 1, length) for t in texts)
  for row in rows:
    for split in ("validation", "train", "test"):
      assert row[f"eval/{split}/num_examples"] == num_examples
      assert row[f"eval/{split}/num_targets"] == num_targets
      assert 0 <= row[f"eval/{split}/accuracy"] <= 1
      assert math.isfinite(row[f"eval/{split}/loss"])
    assert math.isfinite(row["train/loss"])
  kept = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                if d.isdigit())
  assert kept == [2, 4]
