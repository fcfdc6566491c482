"""MNIST-1D with a small 1D convolutional network (Greydanus 2020).

Three strided convolutions (25 channels; kernels 5, 3, 3; stride 2) and a
linear classifier: about 94% test accuracy in the paper, in minutes on a CPU.

config.model fields (defaults below): features, kernel_sizes, dropout_rate,
batch_norm (True inserts `tuning_playbook.batch_norm.BatchNorm`, configured by
`config.batch_norm`, after each convolution). The layers compute in
`config.compute_dtype`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import tensorflow_datasets as tfds

from tuning_playbook import batch_norm
from tuning_playbook import workload as workload_lib
from workloads import mnist1d_data

INPUT_KEY = "x"
LABEL_KEY = "y"
NUM_CLASSES = mnist1d_data.NUM_CLASSES
# The regularizer and its "off" value (see tuning_playbook/workload.py).
REGULARIZATION_OFF = {"model.dropout_rate": 0.0}


class CNN(nn.Module):
  """Strided 1D convolutions, ReLU, and a linear layer on the flattened maps."""
  features: int = 25
  kernel_sizes: Sequence[int] = (5, 3, 3)
  dropout_rate: float = 0.0
  norm: Callable[..., nn.Module] | None = None
  num_classes: int = NUM_CLASSES
  dtype: Any = jnp.float32  # Of the computation; parameters are float32.

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    # [batch, length] -> [batch, length, channels=1]
    x = x[..., None].astype(self.dtype)
    for kernel_size in self.kernel_sizes:
      x = nn.Conv(self.features, (kernel_size,), strides=2,
                  padding=((1, 1),), dtype=self.dtype)(x)
      if self.norm is not None:
        x = self.norm()(x, train=train)
      x = nn.relu(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


def default_model_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "features": 25,
      "kernel_sizes": (5, 3, 3),
      "dropout_rate": 0.0,
      "batch_norm": False,
  })


def model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.model` over the defaults; an unknown field is an error."""
  return workload_lib.merged_model_config(config, default_model_config(), {
      "features": (lambda f: f > 0, "an int > 0"),
      "kernel_sizes": (lambda ks: len(ks) > 0 and all(
          isinstance(k, int) and k > 0 for k in ks), "a non-empty list of ints > 0"),
      "dropout_rate": (lambda r: 0 <= r < 1, "a rate in [0, 1)")})


def dataset_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  return mnist1d_data.builder(config.data.data_dir)


def create_model(config: ml_collections.ConfigDict) -> CNN:
  fields = model_config(config)
  norm = batch_norm.from_config(config.batch_norm) if fields.batch_norm else None
  return CNN(features=fields.features, kernel_sizes=tuple(fields.kernel_sizes),
             dropout_rate=fields.dropout_rate, norm=norm,
             dtype=workload_lib.compute_dtype(config))


def synthetic_spec(config: ml_collections.ConfigDict) -> dict[str, Any]:
  del config  # The shapes are fixed.
  return mnist1d_data.synthetic_spec()
