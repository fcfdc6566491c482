"""CIFAR-10 with a WideResNet (Zagoruyko & Komodakis 2016) and BatchNorm.

Pre-activation WRN-depth-width: 3 groups of (depth - 4) / 6 residual blocks
with 16k, 32k, 64k channels. BatchNorm statistics follow `config.batch_norm`.
The last 5000 training images are the validation split. Training images are
zero-padded by 4 pixels, randomly cropped back to 32x32 and randomly flipped.

config.model fields (defaults below): depth, width, dropout_rate. The layers
compute in `config.compute_dtype`; BatchNorm statistics are float32.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from tuning_playbook import batch_norm
from tuning_playbook import layers
from tuning_playbook import workload as workload_lib

SPLITS = {"train": "train[:45000]", "validation": "train[45000:]",
          "test": "test"}
NUM_CLASSES = 10
# The regularizer and its "off" value (see tuning_playbook/workload.py).
REGULARIZATION_OFF = {"model.dropout_rate": 0.0, "data.augment": False}
# Trials differing only in it share one compiled program (workload.py).
TRACED_HYPERPARAMETERS = ("model.dropout_rate",)
IMAGE_SHAPE = (32, 32, 3)
PAD = 4
CHANNEL_MEAN = (0.4914, 0.4822, 0.4465)
CHANNEL_STD = (0.2470, 0.2435, 0.2616)

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def preprocess(example, *, train: bool, seed: tf.Tensor,
               config: ml_collections.ConfigDict) -> dict[str, tf.Tensor]:
  """Scales to [0, 1], augments (train only, with `config.data.augment`),
  normalizes each channel."""
  image = tf.cast(example["image"], tf.float32) / 255.0
  if train and config.data.augment:
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=2))
    height, width, _ = IMAGE_SHAPE
    image = tf.image.resize_with_crop_or_pad(image, height + 2 * PAD,
                                             width + 2 * PAD)
    image = tf.image.stateless_random_crop(image, IMAGE_SHAPE, seed=crop_seed)
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
  image = (image - CHANNEL_MEAN) / CHANNEL_STD
  return {"inputs": image, "label": tf.cast(example["label"], tf.int32)}


class WideBlock(nn.Module):
  """Pre-activation residual block: (norm, ReLU, 3x3 conv) twice."""
  features: int
  strides: int
  norm: Callable[..., nn.Module]
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32  # Of the computation; parameters are float32.

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    conv = lambda f, k, s: nn.Conv(f, (k, k), strides=(s, s), use_bias=False,
                                   kernel_init=_conv_init, dtype=self.dtype)
    y = nn.relu(self.norm()(x, train=train))
    shortcut = x
    if x.shape[-1] != self.features or self.strides != 1:
      shortcut = conv(self.features, 1, self.strides)(y)
    y = conv(self.features, 3, self.strides)(y)
    y = nn.relu(self.norm()(y, train=train))
    y = layers.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = conv(self.features, 3, 1)(y)
    return y + shortcut


class WideResNet(nn.Module):
  """WRN-`depth`-`width` for 32x32 images."""
  depth: int = 16
  width: int = 4
  norm: Callable[..., nn.Module] = batch_norm.BatchNorm
  dropout_rate: float = 0.0
  num_classes: int = NUM_CLASSES
  dtype: Any = jnp.float32  # Of the computation; parameters are float32.

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.depth < 10 or (self.depth - 4) % 6:
      raise ValueError(f"config.model.depth={self.depth}: must be 6n + 4, "
                       "n >= 1 (10, 16, 22, 28, 40, ...)")
    blocks_per_group = (self.depth - 4) // 6
    x = nn.Conv(16, (3, 3), use_bias=False, kernel_init=_conv_init,
                dtype=self.dtype)(x.astype(self.dtype))
    for group, features in enumerate((16, 32, 64)):
      for block in range(blocks_per_group):
        strides = 2 if group > 0 and block == 0 else 1
        x = WideBlock(features * self.width, strides, self.norm,
                      self.dropout_rate, self.dtype)(x, train=train)
    x = nn.relu(self.norm()(x, train=train))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)


def default_model_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"depth": 16, "width": 4, "dropout_rate": 0.0})


def model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.model` over the defaults; an unknown field is an error."""
  return workload_lib.merged_model_config(config, default_model_config(), {
      "depth": (lambda d: d >= 10 and (d - 4) % 6 == 0,
                "6n + 4 with n >= 1 (10, 16, 22, 28, ...)"),
      "width": (lambda w: w > 0, "an int > 0"),
      "dropout_rate": (lambda r: 0 <= r < 1, "a rate in [0, 1)")})


def dataset_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  builder = tfds.builder("cifar10", data_dir=config.data.data_dir or None)
  builder.download_and_prepare()
  return builder


def create_model(config: ml_collections.ConfigDict) -> WideResNet:
  fields = model_config(config)
  return WideResNet(depth=fields.depth, width=fields.width,
                    norm=batch_norm.from_config(config.batch_norm),
                    dropout_rate=fields.dropout_rate,
                    dtype=workload_lib.compute_dtype(config))


def synthetic_spec(config: ml_collections.ConfigDict) -> dict[str, Any]:
  del config  # The shapes are fixed.
  return {"inputs": jax.ShapeDtypeStruct(IMAGE_SHAPE, jnp.float32),
          "label": jax.ShapeDtypeStruct((), jnp.int32), "num_classes": NUM_CLASSES}
