"""Data-parallel mesh over every device of every host, and global batches.

Each host passes its local slice of the global batch; the global array is
assembled with `jax.make_array_from_process_local_data`, so no host ever
holds (or feeds as if replicated) another host's data.
"""

from __future__ import annotations

import hashlib
import itertools
import queue
import threading
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


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches stacked along a leading steps axis: [steps, batch, ...]."""
  return NamedSharding(mesh, PartitionSpec(None, DATA_AXIS))


def stack_batches(batches: Iterable[dict[str, np.ndarray]],
                  k: int) -> Iterator[dict[str, np.ndarray]]:
  """Groups consecutive batches into arrays with a leading axis of k."""
  iterator = iter(batches)
  while True:
    group = list(itertools.islice(iterator, k))
    if len(group) < k:
      return
    yield {key: np.stack([b[key] for b in group]) for key in group[0]}


def stacked_stream(stream: Any, start_step: int,
                   k: int) -> Iterator[dict[str, np.ndarray]]:
  """A train stream's batches from `start_step`, k at a time along a leading
  axis: the stream's own `iterate_stacked` when it has one (one copy per
  group), else `stack_batches` of its `iterate`."""
  if hasattr(stream, "iterate_stacked"):
    return stream.iterate_stacked(start_step, k)
  return stack_batches(stream.iterate(start_step), k)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def to_global(local_batch: dict[str, np.ndarray],
              sharding: NamedSharding) -> dict[str, jax.Array]:
  """Builds global arrays from this host's slice of the batch."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local_batch.items()}


class ReplicaMismatchError(RuntimeError):
  """A value meant to be replicated differs between devices or hosts."""


def check_replicas_identical(tree: Any, what: str) -> None:
  """Raises ReplicaMismatchError unless every copy of every leaf is identical.

  Compares the copies on this host's devices, then a digest of them across
  hosts. Used on BatchNorm moving averages before evals and checkpoints.
  """
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shards = [np.asarray(s.data) for s in leaf.addressable_shards]
    for device_index, shard in enumerate(shards[1:], start=1):
      if not np.array_equal(shard, shards[0], equal_nan=True):
        raise ReplicaMismatchError(
            f"{what}{jax.tree_util.keystr(path)} differs between local devices "
            f"0 and {device_index} on process {jax.process_index()}")
    digest.update(shards[0].tobytes())
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    local = np.frombuffer(digest.digest(), np.uint32)
    every = np.asarray(multihost_utils.process_allgather(local))
    differing = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
    if differing:
      raise ReplicaMismatchError(
          f"{what} differs between process 0 and process(es) {differing}")


def prefetch_to_devices(batches: Iterable[dict[str, np.ndarray]],
                        sharding: NamedSharding,
                        size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Global batches built and sent to the devices by a background thread.

  Keeps up to `size` batches ready, so the training loop's own thread spends
  no time on the input pipeline. Order is preserved; an error in the pipeline
  is raised in the consumer.
  """
  ready: queue.Queue[Any] = queue.Queue(maxsize=max(1, size))

  def produce():
    try:
      for local in batches:
        ready.put(to_global(local, sharding))
    except BaseException as e:  # pylint: disable=broad-except
      ready.put(_PipelineError(e))
      return
    ready.put(_END)

  threading.Thread(target=produce, daemon=True, name="prefetch-to-devices").start()
  while True:
    item = ready.get()
    if item is _END:
      return
    if isinstance(item, _PipelineError):
      raise item.error
    yield item


_END = object()


class _PipelineError:

  def __init__(self, error: BaseException):
    self.error = error
