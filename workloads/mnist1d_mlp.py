"""MNIST-1D with a ReLU MLP (Greydanus 2020: about 68% test accuracy).

config.model fields (defaults below): width, depth (hidden layers),
dropout_rate. The layers compute in `config.compute_dtype`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import tensorflow_datasets as tfds

from tuning_playbook import workload as workload_lib

from workloads import mnist1d_data

INPUT_KEY = "x"
LABEL_KEY = "y"
# The regularizer and its "off" value (see tuning_playbook/workload.py).
REGULARIZATION_OFF = {"model.dropout_rate": 0.0}


class MLP(nn.Module):
  """`depth` hidden ReLU layers of `width` units and a linear classifier."""
  width: int = 100
  depth: int = 2
  dropout_rate: float = 0.0
  num_classes: int = mnist1d_data.NUM_CLASSES
  dtype: Any = jnp.float32  # Of the computation; parameters are float32.

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = x.reshape((x.shape[0], -1)).astype(self.dtype)
    for _ in range(self.depth):
      x = nn.relu(nn.Dense(self.width, dtype=self.dtype)(x))
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


def default_model_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
      {"width": 100, "depth": 2, "dropout_rate": 0.0})


def model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.model` over the defaults; an unknown field is an error."""
  return workload_lib.merged_model_config(config, default_model_config(), {
      "width": (lambda w: w > 0, "an int > 0"),
      "depth": (lambda d: d >= 0, "an int >= 0"),
      "dropout_rate": (lambda r: 0 <= r < 1, "a rate in [0, 1)")})


def dataset_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  return mnist1d_data.builder(config.data.data_dir)


def create_model(config: ml_collections.ConfigDict) -> MLP:
  fields = model_config(config)
  return MLP(width=fields.width, depth=fields.depth,
             dropout_rate=fields.dropout_rate,
             dtype=workload_lib.compute_dtype(config))


def synthetic_spec(config: ml_collections.ConfigDict) -> dict[str, Any]:
  del config  # The shapes are fixed.
  return mnist1d_data.synthetic_spec()
