"""Training examples held on the devices: transfers carry indices, steps gather.

A small in-memory training split (`in_memory_stream.InMemoryTrainStream`, up
to `config.data.on_device_max_mb`) is put on every device once, replicated.
Each transfer then carries only the example indices of its k batches
(`{"index": int32[k, batch]}`, sharded over the devices like a batch), and
the compiled step gathers its batch from the examples on its own device
(`gather`). The host's work per transfer shrinks to the epoch order, and the
batches are the same arrays, so training computes exactly what host-gathered
batches would give.

Larger splits, tf.data streams and synthetic data keep gathering on the host:
`examples` is then an empty dict, and `gather` passes batches through.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from tuning_playbook.training import sharding

INDEX_KEY = "index"
Examples = dict[str, jax.Array]


def holds_on_device(stream: Any, max_mb: float) -> bool:
  """Whether `stream`'s examples go on the devices: an in-memory split of at
  most `max_mb` MiB (0 turns it off)."""
  return (max_mb > 0 and hasattr(stream, "stacked_indices")
          and stream.nbytes <= max_mb * 2**20)


def place(stream: Any, mesh: Mesh, max_mb: float) -> Examples:
  """The stream's whole split on every device of `mesh` when it
  `holds_on_device`, else {} (each host passes the same arrays: the
  in-memory order is global)."""
  if not holds_on_device(stream, max_mb):
    return {}
  replicated = sharding.replicated(mesh)
  return {name: jax.make_array_from_process_local_data(replicated, array)
          for name, array in stream.examples().items()}


def transfers(stream: Any, start_step: int, k: int,
              on_device: bool) -> Iterator[dict[str, np.ndarray]]:
  """This host's transfers from `start_step`, k batches each: index arrays
  for examples on the devices (`place` gave some), else the batches."""
  if on_device:
    return ({INDEX_KEY: np.ascontiguousarray(index)}
            for index in stream.stacked_indices(start_step, k))
  return sharding.stacked_stream(stream, start_step, k)


def population_transfers(streams: Sequence[Any], start_step: int, k: int,
                         on_device: bool, shared_data: bool
                         ) -> Iterator[dict[str, np.ndarray]]:
  """The transfers of a population: one stream for all trials
  (`shared_data`: one seed), or each trial's stacked on a leading axis."""
  if shared_data:
    return transfers(streams[0], start_step, k, on_device)
  per_trial = [transfers(s, start_step, k, on_device) for s in streams]
  return ({name: np.stack([b[name] for b in group]) for name in group[0]}
          for group in zip(*per_trial))


def gather(batch: dict[str, jax.Array], examples: Examples) -> dict[str, jax.Array]:
  """Inside a step: the batch that `batch` indexes, when the examples are on
  the devices; else `batch` itself."""
  if not examples:
    return batch
  index = batch[INDEX_KEY]
  # Indices come from a permutation of the split: always in bounds.
  return {name: values.at[index].get(mode="promise_in_bounds")
          for name, values in examples.items()}
