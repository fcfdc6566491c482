"""The shipped workloads: MNIST-1D data and models, CIFAR-10 WideResNet."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tuning_playbook.common import config_validation
from tuning_playbook import config_schema
from tuning_playbook import workload as workload_lib
from workloads import cifar10_wrn
from workloads import mnist1d_cnn
from workloads import mnist1d_data
from workloads import mnist1d_mlp

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(name: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def as_numpy(builder, split):
  return tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))


@pytest.fixture(scope="module")
def mnist1d_builders(tmp_path_factory):
  return [mnist1d_data.builder(str(tmp_path_factory.mktemp(f"tfds{i}")))
          for i in range(2)]


@pytest.mark.parametrize("name", ["mnist1d_cnn", "mnist1d_mlp", "cifar10_wrn"])
def test_configs_validate_and_load_their_workload(name):
  config = load_config(name)
  config_validation.validate(config)
  assert config.workload == name
  workload = workload_lib.load_workload(name)
  assert set(workload.splits) == {"train", "validation", "test"}


def test_mnist1d_splits_sizes_shapes_and_dtypes(mnist1d_builders):
  builder = mnist1d_builders[0]
  sizes = {name: split.num_examples for name, split in builder.info.splits.items()}
  assert sizes == {"train": 4000, "validation": 1000, "test": 1000}
  for split, size in sizes.items():
    data = as_numpy(builder, split)
    assert data["x"].shape == (size, 40) and data["x"].dtype == np.float32
    assert data["y"].shape == (size,) and data["y"].dtype == np.int64
    assert set(np.unique(data["y"])) == set(range(10))
    assert np.all(np.isfinite(data["x"]))


def test_mnist1d_builds_are_identical_and_validation_is_new_data(
    mnist1d_builders):
  first, second = mnist1d_builders
  for split in ("train", "validation", "test"):
    a, b = as_numpy(first, split), as_numpy(second, split)
    np.testing.assert_array_equal(a["x"], b["x"])
    np.testing.assert_array_equal(a["y"], b["y"])
  validation = as_numpy(first, "validation")["x"]
  test = as_numpy(first, "test")["x"]
  assert not np.isin(validation[:, 10], test[:, 10]).any()


def test_mnist1d_builder_tolerates_a_concurrent_preparation(tmp_path,
                                                           monkeypatch):
  generate_splits = mnist1d_data.Mnist1d._split_generators
  raced = []

  def split_generators_losing_a_race(self, dl_manager):
    if not raced:  # Another trial prepares the same directory first.
      raced.append(None)
      raced[0] = mnist1d_data.builder(str(tmp_path))
    return generate_splits(self, dl_manager)

  monkeypatch.setattr(mnist1d_data.Mnist1d, "_split_generators",
                      split_generators_losing_a_race)
  builder = mnist1d_data.builder(str(tmp_path))
  assert len(raced) == 1
  np.testing.assert_array_equal(as_numpy(builder, "test")["x"],
                                as_numpy(raced[0], "test")["x"])
  assert [p.name for p in (tmp_path / "mnist1d").iterdir()] == ["1.0.0"]


def test_mnist1d_generation_leaves_global_rng_alone():
  np.random.seed(123)
  expected = np.random.rand(3)
  np.random.seed(123)
  data = mnist1d_data.generate(mnist1d_data.PUBLISHED_SEED)
  np.testing.assert_array_equal(np.random.rand(3), expected)
  assert data["x"].shape == (4000, 40) and data["x_test"].shape == (1000, 40)


def test_mnist1d_default_preprocess(mnist1d_builders):
  workload = workload_lib.load_workload("mnist1d_cnn")
  example = next(iter(mnist1d_builders[0].as_dataset(split="train")))
  out = workload.preprocess(example, train=True,
                            seed=tf.constant([0, 1], tf.int64))
  assert out["inputs"].dtype == tf.float32 and out["inputs"].shape == (40,)
  assert out["label"].dtype == tf.int32
  np.testing.assert_array_equal(out["inputs"], example["x"])


@pytest.mark.parametrize("name,module", [("mnist1d_cnn", mnist1d_cnn),
                                         ("mnist1d_mlp", mnist1d_mlp)])
def test_mnist1d_models_forward(name, module):
  config = load_config(name)
  config.model.dropout_rate = 0.5
  model = module.create_model(config)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 40)), jnp.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  eval_logits = model.apply(variables, x, train=False)
  train_logits = model.apply(variables, x, train=True,
                             rngs={"dropout": jax.random.key(1)})
  for logits in (eval_logits, train_logits):
    assert logits.shape == (6, 10) and bool(jnp.all(jnp.isfinite(logits)))
  assert not np.allclose(eval_logits, train_logits)  # Dropout is active.


def test_mnist1d_cnn_is_the_paper_network():
  model = mnist1d_cnn.create_model(load_config("mnist1d_cnn"))
  variables = model.init(jax.random.key(0), jnp.zeros((1, 40)), train=False)
  params = variables["params"]
  assert [params[f"Conv_{i}"]["kernel"].shape for i in range(3)] == [
      (5, 1, 25), (3, 25, 25), (3, 25, 25)]
  assert params["Dense_0"]["kernel"].shape == (125, 10)  # 25 channels x 5.
  assert "batch_stats" not in variables


def test_mnist1d_cnn_with_batch_norm_keeps_batch_stats():
  config = load_config("mnist1d_cnn")
  config.model.batch_norm = True
  model = mnist1d_cnn.create_model(config)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 40)), jnp.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  before = variables["batch_stats"]["BatchNorm_0"]["mean"]
  after = updates["batch_stats"]["BatchNorm_0"]["mean"]
  assert before.shape == (25,) and not np.allclose(before, after)


@pytest.mark.parametrize("module", [mnist1d_cnn, mnist1d_mlp, cifar10_wrn])
def test_unknown_model_field_is_an_error(module):
  config = config_schema.base_config()
  config.model = ml_collections.ConfigDict({"widht": 3})
  with pytest.raises(ValueError, match=r"config\.model\.widht"):
    module.create_model(config)


@pytest.fixture(scope="module")
def cifar10_examples():
  config = load_config("cifar10_wrn")
  with tfds.testing.mock_data(num_examples=8):
    builder = cifar10_wrn.dataset_builder(config)
    splits = {role: list(builder.as_dataset(split=split).take(8))
              for role, split in cifar10_wrn.SPLITS.items()}
  return splits


def normalized(image):
  return (np.asarray(image, np.float32) / 255.0 - cifar10_wrn.CHANNEL_MEAN
          ) / cifar10_wrn.CHANNEL_STD


def crop_and_flip(out, image):
  """The (row, column, flipped) window of the padded image `out` shows."""
  padded = normalized(np.pad(np.asarray(image), ((4, 4), (4, 4), (0, 0))))
  matches = []
  for row in range(9):
    for col in range(9):
      window = padded[row:row + 32, col:col + 32]
      for flipped in (False, True):
        if np.allclose(out, window[:, ::-1] if flipped else window, atol=1e-5):
          matches.append((row, col, flipped))
  return matches


CIFAR10_CONFIG = load_config("cifar10_wrn")


def test_cifar10_preprocess_eval_only_normalizes(cifar10_examples):
  for example in cifar10_examples["test"]:
    out = cifar10_wrn.preprocess(example, train=False, config=CIFAR10_CONFIG,
                                 seed=tf.constant([0, 0], tf.int64))
    assert out["inputs"].dtype == tf.float32 and out["label"].dtype == tf.int32
    np.testing.assert_allclose(out["inputs"], normalized(example["image"]),
                               atol=1e-5)
    assert int(out["label"]) == int(example["label"])


def test_cifar10_augmentation_switched_off_trains_on_the_eval_images(
    cifar10_examples):
  config = load_config("cifar10_wrn")
  config.data.augment = False
  assert cifar10_wrn.REGULARIZATION_OFF["data.augment"] is False
  for seed, example in enumerate(cifar10_examples["train"]):
    out = cifar10_wrn.preprocess(example, train=True, config=config,
                                 seed=tf.constant([seed, 3], tf.int64))
    np.testing.assert_allclose(out["inputs"], normalized(example["image"]),
                               atol=1e-5)


def test_cifar10_augmentation_is_a_seeded_crop_and_flip(cifar10_examples):
  example = cifar10_examples["train"][0]
  augment = lambda s: cifar10_wrn.preprocess(
      example, train=True, config=CIFAR10_CONFIG,
      seed=tf.constant([s, 3], tf.int64))["inputs"].numpy()
  outputs = {s: augment(s) for s in range(8)}
  windows = set()
  for seed, out in outputs.items():
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, augment(seed))  # Same seed, same output.
    matches = crop_and_flip(out, example["image"])
    assert len(matches) == 1, matches
    windows.add(matches[0])
  assert len(windows) > 1  # Other seeds, other crops or flips.
  assert not np.array_equal(outputs[0], outputs[1])


def tiny_wrn_config(**batch_norm):
  config = load_config("cifar10_wrn")
  config.model.depth = 10
  config.model.width = 1
  config.batch_norm.update(batch_norm)
  return config


def cifar10_batch(examples):
  inputs = [cifar10_wrn.preprocess(e, train=True, config=CIFAR10_CONFIG,
                                   seed=tf.constant([i, 0], tf.int64))["inputs"]
            for i, e in enumerate(examples)]
  return jnp.asarray(np.stack(inputs))


def jitted_apply(model):
  train = jax.jit(lambda v, x: model.apply(v, x, train=True,
                                           mutable=["batch_stats"]))
  evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return train, evaluate


def test_wide_resnet_forward_train_and_eval(cifar10_examples):
  model = cifar10_wrn.create_model(tiny_wrn_config())
  apply_train, apply_eval = jitted_apply(model)
  x = cifar10_batch(cifar10_examples["train"])
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
  logits, updates = apply_train(variables, x)
  assert logits.shape == (8, 10) and bool(jnp.all(jnp.isfinite(logits)))
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b),
                         variables["batch_stats"], updates["batch_stats"])
  assert all(jax.tree.leaves(changed))
  eval_logits = apply_eval(variables, x)
  assert eval_logits.shape == (8, 10)
  assert bool(jnp.all(jnp.isfinite(eval_logits)))
  # Eval uses the moving averages, so an example's logits ignore its batch.
  np.testing.assert_allclose(apply_eval(variables, x[:1]), eval_logits[:1],
                             rtol=1e-4, atol=1e-4)
  train_alone, _ = apply_train(variables, x[:2])
  assert not np.allclose(train_alone[:1], logits[:1], atol=1e-4)


def test_wide_resnet_ghost_batch_norm(cifar10_examples):
  model = cifar10_wrn.create_model(
      tiny_wrn_config(policy="ghost", virtual_batch_size=4))
  apply_train, _ = jitted_apply(model)
  x = cifar10_batch(cifar10_examples["train"])
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
  logits, _ = apply_train(variables, x)
  # Groups of 4: the first group's outputs are those of the group alone.
  first_group, _ = apply_train(variables, x[:4])
  np.testing.assert_allclose(logits[:4], first_group, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match=r"batch_norm\.virtual_batch_size=4"):
    apply_train(variables, x[:6])


def test_default_wide_resnet_is_wrn_16_4():
  model = cifar10_wrn.create_model(load_config("cifar10_wrn"))
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                         train=False))
  num_params = sum(np.prod(p.shape) for p in jax.tree.leaves(shapes["params"]))
  assert 2.7e6 < num_params < 2.8e6  # WRN-16-4 has 2.7M parameters.
  with pytest.raises(ValueError, match=r"config\.model\.depth=12"):
    config = load_config("cifar10_wrn")
    config.model.depth = 12
    cifar10_wrn.create_model(config).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
