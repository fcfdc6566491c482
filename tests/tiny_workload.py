"""A tiny workload for tests: logistic regression on a small local data set.

Split sizes are deliberately not multiples of common batch sizes, so eval
padding is exercised. The model can add dropout and BatchNorm.
"""

import flax.linen as nn
import numpy as np
import tensorflow_datasets as tfds

from tuning_playbook import batch_norm
from tuning_playbook import layers

NUM_FEATURES = 6
NUM_CLASSES = 3
SIZES = {"train": 203, "validation": 61, "test": 47}
INPUT_KEY = "x"
TRACED_HYPERPARAMETERS = ("model.dropout_rate",)
LABEL_KEY = "y"


def make_split(name: str) -> tuple[np.ndarray, np.ndarray]:
  """The examples of a split (deterministic)."""
  rng = np.random.default_rng({"train": 0, "validation": 1, "test": 2}[name])
  x = rng.normal(size=(SIZES[name], NUM_FEATURES)).astype(np.float32)
  w = np.random.default_rng(99).normal(size=(NUM_FEATURES, NUM_CLASSES))
  y = np.argmax(x @ w + 0.5 * rng.normal(size=(SIZES[name], NUM_CLASSES)), axis=1)
  return x, y.astype(np.int64)


class TinyData(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "x": tfds.features.Tensor(shape=(NUM_FEATURES,), dtype=np.float32),
            "y": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            "index": np.int64}))

  def _split_generators(self, dl_manager):
    return {name: self._generate_examples(name) for name in SIZES}

  def _generate_examples(self, name):
    x, y = make_split(name)
    for i in range(len(y)):
      yield i, {"x": x[i], "y": y[i], "index": i}


def dataset_builder(config):
  builder = TinyData(data_dir=config.data.data_dir or None)
  builder.download_and_prepare()
  return builder


class Model(nn.Module):
  dropout_rate: float = 0.0
  use_batch_norm: bool = False
  batch_norm_config: object = None

  @nn.compact
  def __call__(self, x, train: bool):
    if self.use_batch_norm:
      x = batch_norm.from_config(self.batch_norm_config)()(x, train=train)
    x = layers.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(NUM_CLASSES)(x)


def create_model(config):
  return Model(dropout_rate=config.model.get("dropout_rate", 0.0),
               use_batch_norm=config.model.get("use_batch_norm", False),
               batch_norm_config=config.batch_norm)
