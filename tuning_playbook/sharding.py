"""Data-parallel mesh over every device of every host, and global batches.

Each host passes its local slice of the global batch; the global array is
assembled with `jax.make_array_from_process_local_data`, so no host ever
holds (or feeds as if replicated) another host's data.
"""

from __future__ import annotations

import collections
from typing import Any, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def create_mesh() -> Mesh:
  """A 1-D mesh over all devices (all hosts), in `jax.devices()` order."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def to_global(local_batch: dict[str, np.ndarray],
              sharding: NamedSharding) -> dict[str, jax.Array]:
  """Builds global arrays from this host's slice of the batch."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}


def prefetch_to_devices(batches: Iterable[dict[str, np.ndarray]],
                        sharding: NamedSharding,
                        size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Keeps `size` batches in flight to the devices ahead of the consumer."""
  queue: collections.deque[Any] = collections.deque()
  iterator = iter(batches)
  for local in iterator:
    queue.append(to_global(local, sharding))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
