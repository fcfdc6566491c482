"""Batch normalization whose statistics follow `config.batch_norm.policy`.

The training step runs under `jax.jit` on global arrays sharded over devices
and hosts, so a mean over the batch axis is already a cross-device mean: XLA
inserts the communication. What a policy chooses is only which examples share
statistics:

  global:     the whole global batch.
  ghost:      groups of `virtual_batch_size` consecutive examples ("ghost batch
              norm", Hoffer et al. 2017). A group may lie inside one device's
              shard or span several devices; either way it holds exactly
              `virtual_batch_size` examples.
  per_device: groups of the per-device batch (batch / `num_devices`), which is
              what unsynchronized BatchNorm under `pmap` computed.

Usage (`norm` is a partial; each call makes one layer)::

  norm = batch_norm.from_config(config.batch_norm)
  x = norm(name="bn1")(x, train=train)

In training, each group is normalized with its own mean and biased variance.
The moving averages in the "batch_stats" collection (`mean`, `var`) then
update as `ema = momentum * ema + (1 - momentum) * stat`, where `stat` is the
mean over groups of the group means (the batch mean, since groups are equal)
and the mean over groups of the per-group biased variances (not the variance of
the whole batch, which also counts the spread between group means). With one
group both are the usual batch moments. Evaluation normalizes with the moving
averages, so eval batches (padded or not) never enter any moment. `init`
accepts any batch size and leaves the moving averages at mean 0, variance 1.
Moments, moving averages, scale and bias are float32 whatever the input dtype
(a bfloat16 model's activations, say); the output has the input's dtype.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections

from tuning_playbook import config_schema

POLICIES = config_schema.BATCH_NORM_POLICIES


class BatchNorm(nn.Module):
  """BatchNorm over the last (feature) axis with global/ghost/per-device stats.

  Attributes:
    policy: "global", "ghost" or "per_device".
    virtual_batch_size: examples per group for "ghost".
    num_devices: devices the batch is sharded over, for "per_device".
    momentum: decay of the moving averages.
    epsilon: added to the variance before the square root.
    dtype: output dtype; None keeps the input's. Statistics are float32.
  """
  policy: str = "global"
  virtual_batch_size: int = 0
  num_devices: int = 1
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None
  scale_init: Callable[..., jax.Array] = nn.initializers.ones
  bias_init: Callable[..., jax.Array] = nn.initializers.zeros

  def group_size(self, batch_size: int) -> int:
    """Examples per statistics group for a training batch of `batch_size`."""
    if self.policy == "global":
      return batch_size
    if self.policy == "ghost":
      size = self.virtual_batch_size
      if size <= 0 or batch_size % size:
        raise ValueError(
            f"batch_norm.virtual_batch_size={size} must be positive and "
            f"divide the training batch ({batch_size} examples) into groups")
      return size
    if self.policy == "per_device":
      if self.num_devices <= 0 or batch_size % self.num_devices:
        raise ValueError(
            f"batch_norm.policy='per_device': the training batch "
            f"({batch_size} examples) does not split over "
            f"num_devices={self.num_devices}")
      return batch_size // self.num_devices
    raise ValueError(f"batch_norm.policy={self.policy!r} is invalid: "
                     f"allowed: {', '.join(POLICIES)}")

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.policy not in POLICIES:
      raise ValueError(f"batch_norm.policy={self.policy!r} is invalid: "
                       f"allowed: {', '.join(POLICIES)}")
    features = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean",
                            lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var",
                           lambda: jnp.ones((features,), jnp.float32))
    scale = self.param("scale", self.scale_init, (features,), jnp.float32)
    bias = self.param("bias", self.bias_init, (features,), jnp.float32)
    x32 = x.astype(jnp.float32)

    if train:
      batch = x.shape[0]
      try:
        size = self.group_size(batch)
      except ValueError:
        if not self.is_initializing():
          raise
        size = batch  # Shapes alone matter at init; any batch may be used.
      y, mean, var = _normalize_in_groups(x32, size, self.epsilon)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * mean.mean(0)
        ra_var.value = m * ra_var.value + (1 - m) * var.mean(0)
    else:
      y = (x32 - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)

    return (y * scale + bias).astype(self.dtype or x.dtype)


def _normalize_in_groups(x: jax.Array, size: int, epsilon: float):
  """Normalizes groups of `size` consecutive examples by their own moments.

  Returns the output and the group means and biased variances ([groups,
  features]). Only per-example moments ([batch, features]) are regrouped, so
  when the batch axis is explicitly sharded, reshaping it into groups costs a
  gather of those, never of the activations.
  """
  batch, features = x.shape[0], x.shape[-1]
  spatial = tuple(range(1, x.ndim - 1))
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  explicit = spec is not None and spec[0] is not None

  def group_mean(per_example):  # [batch, features] -> [groups, features]
    if explicit:
      per_example = jax.sharding.reshard(
          per_example, NamedSharding(sharding.mesh, P(None, spec[-1])))
    return per_example.reshape(batch // size, size, features).mean(axis=1)

  def per_example(per_group):  # [groups, features] -> broadcastable to x
    full = jnp.repeat(per_group, size, axis=0)
    if explicit:
      full = jax.sharding.reshard(
          full, NamedSharding(sharding.mesh, P(spec[0], spec[-1])))
    return jnp.expand_dims(full, spatial)

  mean = group_mean(jnp.mean(x, axis=spatial))
  centered = x - per_example(mean)
  var = group_mean(jnp.mean(jnp.square(centered), axis=spatial))
  return centered * jax.lax.rsqrt(per_example(var) + epsilon), mean, var


def from_config(batch_norm_config: ml_collections.ConfigDict, *,
                num_devices: int | None = None,
                **kwargs) -> Callable[..., BatchNorm]:
  """A `BatchNorm` partial set from `config.batch_norm`.

  Args:
    batch_norm_config: `config.batch_norm` (policy, virtual_batch_size,
      momentum).
    num_devices: devices the training batch is sharded over ("per_device");
      None means `jax.device_count()`.
    **kwargs: other `BatchNorm` fields (epsilon, dtype, ...).
  """
  if batch_norm_config.policy not in POLICIES:
    raise ValueError(f"batch_norm.policy={batch_norm_config.policy!r} is "
                     f"invalid: allowed: {', '.join(POLICIES)}")
  return functools.partial(
      BatchNorm,
      policy=batch_norm_config.policy,
      virtual_batch_size=batch_norm_config.virtual_batch_size,
      num_devices=jax.device_count() if num_devices is None else num_devices,
      momentum=batch_norm_config.momentum,
      **kwargs)
