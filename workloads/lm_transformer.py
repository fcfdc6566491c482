"""LM1B next-byte prediction with a decoder-only Transformer.

Tokens are UTF-8 bytes shifted past two reserved ids (0 pads, 1 begins and
ends a sentence): 258 ids, nothing to download. Targets are a sentence's ids
then the end mark, inputs the same shifted right behind the begin mark, both
cut or padded to `config.data.max_length`. Loss and accuracy are per target
byte, padding masked out (`weights_fn`): eval loss / ln 2 is bits per byte.

Pre-LayerNorm blocks (causal self-attention, then a GELU MLP), as in GPT-2
and flax examples/lm1b. The first 20000 heldout sentences are the validation
split, the next 20000 the test split.

config.model fields (defaults below): num_layers, emb_dim, num_heads,
mlp_dim, dropout_rate, max_len (positions; >= config.data.max_length),
position_embedding ("learned" | "sinusoidal"), tied_embedding (the output
layer is the input embedding, transposed).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tuning_playbook import workload as workload_lib

SPLITS = {"train": "train", "validation": "test[:20000]",
          "test": "test[20000:40000]"}
# The regularizer and its "off" value (see tuning_playbook/workload.py).
REGULARIZATION_OFF = {"model.dropout_rate": 0.0}
PAD_ID, EOS_ID, NUM_RESERVED_IDS = 0, 1, 2  # EOS also begins every input.
VOCAB_SIZE = 256 + NUM_RESERVED_IDS


def preprocess(example, *, train: bool, seed: tf.Tensor,
               config: ml_collections.ConfigDict) -> dict[str, tf.Tensor]:
  """inputs = [EOS] + byte ids, label = byte ids + [EOS], each cut or padded
  to config.data.max_length."""
  del train, seed  # No augmentation.
  length = config.data.max_length
  ids = tf.cast(tf.io.decode_raw(example["text"], tf.uint8), tf.int32)
  ids, eos = ids + NUM_RESERVED_IDS, tf.constant([EOS_ID], tf.int32)
  fit = lambda x: tf.ensure_shape(
      tf.pad(x[:length], [[0, length - tf.shape(x[:length])[0]]]), [length])
  return {"inputs": fit(tf.concat([eos, ids], 0)),
          "label": fit(tf.concat([ids, eos], 0))}


def weights_fn(labels: jax.Array) -> jax.Array:
  """Padding targets weigh 0, every other target 1."""
  return (labels != PAD_ID).astype(jnp.float32)


def sinusoidal_positions(max_len: int, features: int) -> np.ndarray:
  """Fixed position encodings (Vaswani et al. 2017): float32[max_len, features]."""
  angle = np.arange(max_len)[:, None] * np.exp(
      np.arange(0, features, 2) * -np.log(10000.0) / features)
  table = np.zeros((max_len, features), np.float32)
  table[:, 0::2], table[:, 1::2] = np.sin(angle), np.cos(angle[:, :features // 2])
  return table


class DecoderBlock(nn.Module):
  """x + attention(norm(x)), then x + mlp(norm(x)), causally masked."""
  num_heads: int
  mlp_dim: int
  dropout_rate: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, *, train: bool) -> jax.Array:
    dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
    # LayerNorm reduces in float32 whatever `dtype` (force_float32_reductions).
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(
        self.num_heads, dtype=self.dtype, force_fp32_for_softmax=True)(y, mask=mask)
    x = x + dropout(y)
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype)(y))
    return x + dropout(nn.Dense(x.shape[-1], dtype=self.dtype)(y))


class TransformerLM(nn.Module):
  """Token ids int32[batch, length] -> next-token logits [batch, length, vocab]."""
  num_layers: int
  emb_dim: int
  num_heads: int
  mlp_dim: int
  dropout_rate: float
  max_len: int
  position_embedding: str
  tied_embedding: bool
  dtype: Any = jnp.float32
  vocab_size: int = VOCAB_SIZE

  @nn.compact
  def __call__(self, tokens: jax.Array, *, train: bool) -> jax.Array:
    length = tokens.shape[-1]
    embed = nn.Embed(self.vocab_size, self.emb_dim,
                     embedding_init=nn.initializers.normal(1.0))
    if self.position_embedding == "learned":
      positions = self.param("position_embedding", nn.initializers.normal(0.02),
                             (self.max_len, self.emb_dim))
    else:
      positions = jnp.asarray(sinusoidal_positions(self.max_len, self.emb_dim))
    x = embed(tokens) + positions[:length]
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x).astype(self.dtype)
    # Padding follows every real position, so the causal mask hides it too.
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.num_layers):
      x = DecoderBlock(self.num_heads, self.mlp_dim, self.dropout_rate,
                       self.dtype)(x, mask, train=train)
    # The output layer runs in float32: 258 ids cost little next to the blocks.
    x = nn.LayerNorm(dtype=jnp.float32)(x)
    if self.tied_embedding:
      return embed.attend(x) / jnp.sqrt(self.emb_dim)
    return nn.Dense(self.vocab_size, dtype=jnp.float32)(x)


def default_model_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "num_layers": 6, "emb_dim": 512, "num_heads": 8, "mlp_dim": 2048,
      "dropout_rate": 0.0, "max_len": 128, "position_embedding": "learned",
      "tied_embedding": True})


def model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.model` over the defaults, checked; also checks data.max_length."""
  checks = {name: (lambda n: n >= 1, "an int >= 1") for name in (
      "num_layers", "emb_dim", "num_heads", "mlp_dim", "max_len")}
  checks["dropout_rate"] = (lambda r: 0 <= r < 1, "a rate in [0, 1)")
  checks["position_embedding"] = (lambda p: p in ("learned", "sinusoidal"),
                                  "'learned' or 'sinusoidal'")
  fields = workload_lib.merged_model_config(config, default_model_config(), checks)
  if fields.emb_dim % fields.num_heads:
    raise workload_lib.ModelConfigError(
        f"config.model.emb_dim={fields.emb_dim!r} is invalid: workload "
        f"{config.workload!r} needs a multiple of num_heads ({fields.num_heads})")
  if not 1 <= config.data.max_length <= fields.max_len:
    raise workload_lib.ModelConfigError(
        f"config.data.max_length={config.data.max_length!r} is invalid: "
        f"workload {config.workload!r} needs 1 <= it <= config.model.max_len "
        f"({fields.max_len})")
  return fields


def dataset_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  builder = tfds.builder("lm1b", data_dir=config.data.data_dir or None)
  builder.download_and_prepare()
  return builder


def create_model(config: ml_collections.ConfigDict) -> TransformerLM:
  return TransformerLM(dtype=workload_lib.compute_dtype(config),
                       **model_config(config).to_dict())


def synthetic_spec(config: ml_collections.ConfigDict) -> dict[str, Any]:
  shape = (config.data.max_length,)
  return {"inputs": jax.ShapeDtypeStruct(shape, jnp.int32),
          "label": jax.ShapeDtypeStruct(shape, jnp.int32),
          "num_classes": VOCAB_SIZE}
