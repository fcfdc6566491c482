"""ImageNet with ResNet v1.5 (He et al. 2016) and the framework's BatchNorm.

v1.5 puts the stride of a downsampling bottleneck in its 3x3 convolution, and
the last BatchNorm of each residual block starts with scale 0, so every block
starts as the identity (Goyal et al. 2017). BatchNorm statistics follow
`config.batch_norm`; the layers compute in `config.compute_dtype`. Data,
splits, augmentation and the loss: `workloads/imagenet_data.py`.

config.model fields (defaults below): depth (18, 34, 50, 101 or 152),
width_multiplier (of the 64, 128, 256, 512 channels of the four stages),
num_classes, image_size (the side of the square crops), label_smoothing.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from tuning_playbook import batch_norm
from tuning_playbook import workload as workload_lib
from workloads import imagenet_data

SPLITS = imagenet_data.SPLITS
# The regularizer and its "off" value (see tuning_playbook/workload.py).
REGULARIZATION_OFF = {"model.label_smoothing": 0.0, "data.augment": False}
# Trials differing only in it share one compiled program (workload.py).
TRACED_HYPERPARAMETERS = ("model.label_smoothing",)
dataset_builder = imagenet_data.dataset_builder
# depth -> (blocks per stage, bottleneck blocks).
STAGES = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False),
          50: ((3, 4, 6, 3), True), 101: ((3, 4, 23, 3), True),
          152: ((3, 8, 36, 3), True)}

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class ResidualBlock(nn.Module):
  """Basic (two 3x3) or bottleneck (1x1, strided 3x3, 1x1 x4) block."""
  features: int
  strides: int
  bottleneck: bool
  norm: Callable[..., nn.Module]
  dtype: Any = jnp.float32  # Of the computation; parameters are float32.

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=_conv_init,
                             dtype=self.dtype)
    strides = (self.strides, self.strides)
    if self.bottleneck:
      out = 4 * self.features
      y = nn.relu(self.norm()(conv(self.features, (1, 1))(x), train=train))
      y = conv(self.features, (3, 3), strides)(y)
    else:
      out = self.features
      y = conv(self.features, (3, 3), strides)(x)
    y = nn.relu(self.norm()(y, train=train))
    y = conv(out, (3, 3) if not self.bottleneck else (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros)(y, train=train)
    if x.shape[-1] != out or self.strides != 1:
      x = self.norm()(conv(out, (1, 1), strides)(x), train=train)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet for ImageNet-sized images: a 7x7 stem, four stages, GAP, dense."""
  stage_sizes: tuple[int, ...]
  bottleneck: bool
  width: int = 64
  num_classes: int = imagenet_data.NUM_CLASSES
  norm: Callable[..., nn.Module] = batch_norm.BatchNorm
  dtype: Any = jnp.float32  # Of the computation; parameters are float32.

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = nn.Conv(self.width, (7, 7), (2, 2), padding=((3, 3), (3, 3)),
                use_bias=False, kernel_init=_conv_init, dtype=self.dtype,
                name="stem")(x.astype(self.dtype))
    x = nn.relu(self.norm(name="stem_norm")(x, train=train))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for stage, blocks in enumerate(self.stage_sizes):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = ResidualBlock(self.width * 2**stage, strides, self.bottleneck,
                          self.norm, self.dtype)(x, train=train)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


def default_model_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "depth": 50, "width_multiplier": 1.0,
      "num_classes": imagenet_data.NUM_CLASSES, "image_size": 224,
      "label_smoothing": 0.0})


def model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.model` over the defaults, checked; an unknown field is an error."""
  return workload_lib.merged_model_config(config, default_model_config(), {
      "depth": (lambda d: d in STAGES, f"one of {sorted(STAGES)}"),
      "width_multiplier": (lambda w: 64 * w >= 1, "a float >= 1/64"),
      "num_classes": (lambda n: n > 0, "an int > 0"),
      "image_size": (lambda s: s >= 32, "an int >= 32 (the stride of the net)"),
      "label_smoothing": (lambda a: 0 <= a < 1, "a float in [0, 1)")})


def create_model(config: ml_collections.ConfigDict) -> ResNet:
  fields = model_config(config)
  stage_sizes, bottleneck = STAGES[fields.depth]
  return ResNet(stage_sizes=stage_sizes, bottleneck=bottleneck,
                width=int(64 * fields.width_multiplier),
                num_classes=fields.num_classes,
                norm=batch_norm.from_config(config.batch_norm),
                dtype=workload_lib.compute_dtype(config))


preprocess, loss_fn, synthetic_spec = imagenet_data.workload_functions(
    model_config)
