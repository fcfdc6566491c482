"""ImageNet with a Vision Transformer (Dosovitskiy et al. 2021), big_vision style.

Pre-LayerNorm encoder blocks over non-overlapping patches, with global average
pooling and fixed 2-D sin-cos position embeddings by default (Beyer et al.
2022), a zero-initialized linear head. Layers compute in
`config.compute_dtype`; LayerNorm statistics and the attention softmax are
float32. Data, splits, augmentation and the loss: `workloads/imagenet_data.py`.

config.model fields (defaults below): variant ("Ti/16", "S/16", "B/16",
"L/16"; any "<size>/<patch>"), and hidden_size, depth, num_heads, mlp_dim,
patch_size, each 0 for the variant's; pool ("gap" or "token"), posemb
("sincos2d" or "learned"), dropout_rate, num_classes, image_size,
label_smoothing.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from tuning_playbook import layers
from tuning_playbook import workload as workload_lib
from workloads import imagenet_data

SPLITS = imagenet_data.SPLITS
# The regularizers and their "off" values (see tuning_playbook/workload.py).
REGULARIZATION_OFF = {"model.dropout_rate": 0.0, "model.label_smoothing": 0.0,
                      "data.augment": False}
# Trials differing only in these share one compiled program (workload.py).
TRACED_HYPERPARAMETERS = ("model.dropout_rate", "model.label_smoothing")
dataset_builder = imagenet_data.dataset_builder
# size -> (hidden_size, depth, num_heads, mlp_dim).
SIZES = {"Ti": (192, 12, 3, 768), "S": (384, 12, 6, 1536),
         "B": (768, 12, 12, 3072), "L": (1024, 24, 16, 4096)}


def posemb_sincos_2d(height: int, width: int, dim: int) -> jax.Array:
  """Fixed [1, height * width, dim] embedding: sin, cos of x, then of y."""
  omega = 1.0 / 10_000 ** (jnp.arange(dim // 4) / max(dim // 4 - 1, 1))
  y, x = jnp.mgrid[:height, :width]
  x = x.reshape(-1, 1) * omega
  y = y.reshape(-1, 1) * omega
  return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)],
                         axis=1)[None]


class EncoderBlock(nn.Module):
  """x + attention(LN(x)), then x + MLP(LN(x)); dropout on each branch."""
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32  # Of the computation; parameters are float32.

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              kernel_init=nn.initializers.xavier_uniform(),
                              bias_init=nn.initializers.normal(1e-6))
    dropout = layers.Dropout(self.dropout_rate, deterministic=not train)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(
        self.num_heads, dtype=self.dtype, force_fp32_for_softmax=True,
        kernel_init=nn.initializers.xavier_uniform())(y, y)
    x = x + dropout(y)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = dense(self.mlp_dim)(y)
    y = dense(x.shape[-1])(dropout(nn.gelu(y)))
    return x + dropout(y)


class VisionTransformer(nn.Module):
  """ViT classifier: patches, position embeddings, encoder, pooling, head."""
  patch_size: int = 16
  hidden_size: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_dim: int = 1536
  num_classes: int = imagenet_data.NUM_CLASSES
  pool: str = "gap"  # "gap" or "token" (a learned class token).
  posemb: str = "sincos2d"  # "sincos2d" or "learned".
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32  # Of the computation; parameters are float32.

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    p = self.patch_size
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID",
                dtype=self.dtype, name="embedding")(x.astype(self.dtype))
    batch, height, width, dim = x.shape
    x = x.reshape(batch, height * width, dim)
    if self.posemb == "learned":
      pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                       (1, height * width, dim))
    else:
      pos = posemb_sincos_2d(height, width, dim)
    x = x + pos.astype(self.dtype)
    if self.pool == "token":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, dim))
      x = jnp.concatenate([jnp.tile(cls, (batch, 1, 1)).astype(self.dtype), x], 1)
    x = layers.Dropout(self.dropout_rate, deterministic=not train)(x)
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout_rate,
                       self.dtype, name=f"block{i}")(x, train=train)
    x = nn.LayerNorm(dtype=self.dtype, name="encoder_norm")(x)
    x = x[:, 0] if self.pool == "token" else jnp.mean(x.astype(jnp.float32), 1)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head",
                    kernel_init=nn.initializers.zeros)(x)


def default_model_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "variant": "S/16", "hidden_size": 0, "depth": 0, "num_heads": 0,
      "mlp_dim": 0, "patch_size": 0, "pool": "gap", "posemb": "sincos2d",
      "dropout_rate": 0.0, "num_classes": imagenet_data.NUM_CLASSES,
      "image_size": 224, "label_smoothing": 0.0})


def _variant_ok(variant: str) -> bool:
  size, _, patch = variant.partition("/")
  return size in SIZES and patch.isdigit() and int(patch) > 0


def model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.model` over the defaults with the variant's sizes filled in."""
  fields = workload_lib.merged_model_config(config, default_model_config(), {
      "variant": (_variant_ok, f"<size>/<patch> with size in {list(SIZES)}"),
      **{k: (lambda n: n >= 0, "an int >= 0 (0: the variant's)")
         for k in ("hidden_size", "depth", "num_heads", "mlp_dim", "patch_size")},
      "pool": (lambda p: p in ("gap", "token"), "'gap' or 'token'"),
      "posemb": (lambda p: p in ("sincos2d", "learned"), "'sincos2d' or 'learned'"),
      "dropout_rate": (lambda r: 0 <= r < 1, "a rate in [0, 1)"),
      "num_classes": (lambda n: n > 0, "an int > 0"),
      "image_size": (lambda s: s > 0, "an int > 0"),
      "label_smoothing": (lambda a: 0 <= a < 1, "a float in [0, 1)")})
  size, _, patch = fields.variant.partition("/")
  for key, value in zip(("hidden_size", "depth", "num_heads", "mlp_dim"), SIZES[size]):
    fields[key] = fields[key] or value
  fields.patch_size = fields.patch_size or int(patch)
  for key, ok, allowed in [
      ("image_size", fields.image_size % fields.patch_size == 0,
       f"a multiple of the patch size {fields.patch_size}"),
      ("num_heads", fields.hidden_size % fields.num_heads == 0,
       f"a divisor of hidden_size={fields.hidden_size}"),
      ("hidden_size", fields.posemb != "sincos2d" or fields.hidden_size % 4 == 0,
       "a multiple of 4 for posemb='sincos2d'")]:
    if not ok:
      raise workload_lib.ModelConfigError(
          f"config.model.{key}={fields[key]!r} is invalid: workload "
          f"{config.workload!r} needs {allowed}")
  return fields


def create_model(config: ml_collections.ConfigDict) -> VisionTransformer:
  fields = model_config(config)
  return VisionTransformer(
      patch_size=fields.patch_size, hidden_size=fields.hidden_size,
      depth=fields.depth, num_heads=fields.num_heads, mlp_dim=fields.mlp_dim,
      num_classes=fields.num_classes, pool=fields.pool, posemb=fields.posemb,
      dropout_rate=fields.dropout_rate, dtype=workload_lib.compute_dtype(config))


preprocess, loss_fn, synthetic_spec = imagenet_data.workload_functions(
    model_config)
