"""The device mesh, the train state's shardings over it, and global batches.

The mesh (`config.sharding.mesh`) has the axes "data" and "fsdp" and spans
every device of every host. The batch is split over both axes. Parameters,
gradients, optimizer state and EMA are split over "fsdp" (fully sharded data
parallelism): XLA all-gathers an array where the step needs it whole and
reduce-scatters its gradient. With fsdp=1 every device holds the whole state
(plain data parallelism).

Each array of the state is split along its largest dimension divisible by the
fsdp size; arrays smaller than `config.sharding.fsdp_min_size` elements, and
those with no such dimension, stay replicated, as do the BatchNorm moving
averages (checked replica by replica, `check_replicas_identical`). A workload
module may declare `SHARDING_RULES`: (regular expression, spec) pairs matched
(`re.search`) against a leaf's path, such as "params/Dense_0/kernel" or
"opt_state/0/mu/Dense_0/kernel"; the first match gives the leaf's
PartitionSpec as a tuple of axis names or None per dimension (() replicates).

Each host passes its local slice of the global batch; the global array is
assembled with `jax.make_array_from_process_local_data`, so no host ever
holds (or feeds as if replicated) another host's data.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import queue
import re
import threading
from typing import Any, Iterable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from tuning_playbook import config_schema

DATA_AXIS, FSDP_AXIS = config_schema.MESH_AXES
# The batch axis is split over every device: both mesh axes.
BATCH_AXES = config_schema.MESH_AXES
# State fields that are never split (compared replica by replica).
REPLICATED_FIELDS = ("batch_stats",)


class ShardingError(ValueError):
  """A sharding rule that does not fit an array."""


def create_mesh(config: ml_collections.ConfigDict | None = None) -> Mesh:
  """The mesh of `config.sharding.mesh` over all devices of all hosts (None:
  data parallel), built by `jax.make_mesh` (whose device order suits the
  platform's topology)."""
  if config is None:
    sizes = {DATA_AXIS: jax.device_count(), FSDP_AXIS: 1}
  else:
    sizes = config_schema.mesh_axis_sizes(config, jax.device_count())
  return jax.make_mesh(tuple(sizes[a] for a in config_schema.MESH_AXES),
                       config_schema.MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(config_schema.MESH_AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches stacked along a leading steps axis: [steps, batch, ...]."""
  return NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))


def per_trial_batch_sharding(mesh: Mesh) -> NamedSharding:
  """Each trial's own stacked batches: [trials, steps, batch, ...]."""
  return NamedSharding(mesh, PartitionSpec(None, None, BATCH_AXES))


def leaf_name(path: Any) -> str:
  """A state leaf's path as rules match it: "params/Dense_0/kernel"."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> PartitionSpec:
  """The array split along its largest dimension divisible by `fsdp_size`
  (the last such among equals); replicated when small or indivisible."""
  if fsdp_size == 1 or math.prod(shape) < max(min_size, 1):
    return PartitionSpec()
  for dim in sorted(range(len(shape)), key=lambda d: (shape[d], d), reverse=True):
    if shape[dim] % fsdp_size == 0:
      return PartitionSpec(*[FSDP_AXIS if d == dim else None
                             for d in range(len(shape))])
  return PartitionSpec()


def _rule_sharding(name: str, shape: Sequence[int], spec: Sequence[Any],
                   pattern: str, mesh: Mesh) -> NamedSharding:
  """A workload rule's spec for one leaf, checked against its shape."""
  spec = tuple(spec)
  if spec and len(spec) != len(shape):
    raise ShardingError(
        f"SHARDING_RULES entry {pattern!r} gives {spec} for {name} of shape "
        f"{tuple(shape)}: one axis name or None per dimension (or () to replicate)")
  used = []
  for dim, axes in enumerate(spec):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    if any(a in used for a in names):
      raise ShardingError(
          f"SHARDING_RULES entry {pattern!r} for {name} uses a mesh axis for two "
          f"dimensions ({spec}): each axis splits one dimension at most")
    used.extend(names)
    unknown = [a for a in names if a not in mesh.shape]
    if unknown:
      raise ShardingError(
          f"SHARDING_RULES entry {pattern!r} names mesh axis {unknown[0]!r} "
          f"for {name}; allowed: {', '.join(mesh.axis_names)}")
    size = math.prod(mesh.shape[a] for a in names)
    if shape[dim] % size:
      raise ShardingError(
          f"SHARDING_RULES entry {pattern!r} splits dimension {dim} of {name} "
          f"(shape {tuple(shape)}) over {size} devices, which do not divide it")
  return NamedSharding(mesh, PartitionSpec(*spec))


def state_shardings(abstract_state: Any, mesh: Mesh, *, min_size: int,
                    rules: Sequence[tuple[str, Sequence[Any]]] = ()) -> Any:
  """One trial's state shardings: workload rules, else `fsdp_spec`."""
  fsdp_size = mesh.shape[FSDP_AXIS]

  def leaf_sharding(path, leaf):
    name = leaf_name(path)
    if name.split("/", 1)[0] in REPLICATED_FIELDS or fsdp_size == 1:
      return NamedSharding(mesh, PartitionSpec())
    for pattern, spec in rules:
      if re.search(pattern, name):
        return _rule_sharding(name, leaf.shape, spec, pattern, mesh)
    return NamedSharding(mesh, fsdp_spec(leaf.shape, fsdp_size, min_size))

  return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)


def stacked_shardings(trial_shardings: Any) -> Any:
  """The shardings of trial states stacked along a new leading axis."""
  return jax.tree.map(
      lambda s: NamedSharding(s.mesh, PartitionSpec(None, *s.spec) if s.spec
                              else PartitionSpec()), trial_shardings)


def bytes_per_device(abstract_state: Any) -> int:
  """The bytes one device holds of a state with shardings (the largest
  shard of each leaf)."""
  total = 0
  for leaf in jax.tree.leaves(abstract_state):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


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
