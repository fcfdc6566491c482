"""Flax layers whose hyperparameters may be traced values.

A workload that declares `model.dropout_rate` in `TRACED_HYPERPARAMETERS`
(tuning_playbook/workload.py) builds its dropout with `layers.Dropout`, so
that trials differing only in the rate share one compiled program.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class Dropout(nn.Module):
  """`flax.linen.Dropout` whose rate may be a traced scalar.

  With a Python number it computes exactly what Flax's Dropout computes (the
  same RNG stream: the module has the same name and draws the same key).
  With a traced rate it never skips the mask: a rate of 0 keeps every value
  (the mask is all ones), at the cost of drawing it.
  """
  rate: Any
  deterministic: bool | None = None

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool | None = None) -> jax.Array:
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    concrete = isinstance(self.rate, (int, float))
    if deterministic or (concrete and self.rate == 0.0):
      return inputs
    if concrete and self.rate == 1.0:  # Flax's guard against NaN gradients.
      return jnp.zeros_like(inputs)
    keep_prob = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), p=keep_prob,
                                shape=inputs.shape)
    scale = keep_prob if concrete else jnp.asarray(keep_prob, inputs.dtype)
    return jax.lax.select(mask, inputs / scale, jnp.zeros_like(inputs))
