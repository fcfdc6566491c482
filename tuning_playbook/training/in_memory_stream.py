"""A training stream over a whole split held in memory as numpy arrays.

Used for workloads without a custom `preprocess` (nothing per example but
picking and casting two features), where tf.data's per-example cost would
exceed the cost of a training step of a small model.

The order is global: one permutation of the split per epoch, a stable hash
of (seed, epoch, example index) (`stable_hash`), the same on every machine
and NumPy version. Global batch s is positions
[s * batch, (s + 1) * batch) of that stream, and each host takes its own
contiguous slice of it. The data a step trains on therefore does not depend
on the number of hosts, and resuming at step s needs no iterator state.
"""

from __future__ import annotations

import copy
from typing import Iterator

import numpy as np

from tuning_playbook.common import stable_hash
from tuning_playbook import input_pipeline

def used_for(config, workload) -> bool:
  """Whether a trial of `config` trains from this stream: real data held in
  memory (`data.cache`) by a workload with no per-example `preprocess`."""
  return (not config.data.synthetic and config.data.cache
          and not workload.custom_preprocess)


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of the n examples in `epoch` (int64 indices): their hashes'
  stable ascending order."""
  scores = stable_hash.hash64(seed, epoch, np.arange(n, dtype=np.uint64))
  # A stable sort is 4x slower; both orders agree when no two scores tie,
  # which is nearly always (checked: a tie falls back to the stable sort).
  order = np.argsort(scores)
  ranked = scores[order]
  if np.any(ranked[1:] == ranked[:-1]):
    return np.argsort(scores, kind="stable")
  return order


def index_dtype(n: int) -> np.dtype:
  """int32 for indices into n examples, int64 if n needs it."""
  return np.dtype(np.int32 if n <= np.iinfo(np.int32).max + 1 else np.int64)


class InMemoryTrainStream:
  """Same interface as `input_pipeline.TrainStream`, without tf.data per step.

  `examples_per_epoch` counts the whole split (the order is global).
  """

  def __init__(self, builder, split: str, *, input_key: str, label_key: str,
               seed: int, local_batch_size: int, process_index: int,
               process_count: int):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    input_pipeline.hide_accelerators_from_tensorflow()
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1,
                                            shuffle_files=False))
    self._inputs = np.asarray(data[input_key], np.float32)
    self._labels = np.asarray(data[label_key], np.int32)
    # One seed for all hosts: the order is global, not per host.
    self._seed = input_pipeline.host_seed(seed, 0)
    self.local_batch_size = local_batch_size
    self.global_batch_size = local_batch_size * process_count
    self._host_offset = local_batch_size * process_index
    self.examples_per_epoch = len(self._labels)
    self.layout = [self.examples_per_epoch]  # One global order, any host count.
    if self.examples_per_epoch == 0:
      raise ValueError(f"split {split!r} has no examples")

  def with_seed(self, seed: int) -> InMemoryTrainStream:
    """The same examples (shared, not copied) in the order of another seed."""
    other = copy.copy(self)
    other._seed = input_pipeline.host_seed(seed, 0)  # pylint: disable=protected-access
    return other

  def position(self, step: int) -> input_pipeline.DataPosition:
    start = step * self.global_batch_size
    return input_pipeline.DataPosition(
        step=step, epoch=start // self.examples_per_epoch,
        offset_in_epoch=start % self.examples_per_epoch,
        examples_per_epoch=self.examples_per_epoch)

  def element_spec(self) -> tuple[tuple[int, ...], np.dtype]:
    """Shape (without batch) and dtype of the model inputs."""
    return self._inputs.shape[1:], self._inputs.dtype

  def iterate(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    """This host's slices of the global batches from `start_step` on."""
    for (index,) in self.stacked_indices(start_step, 1):
      yield {"inputs": self._inputs[index], "label": self._labels[index]}

  def iterate_stacked(self, start_step: int,
                      k: int) -> Iterator[dict[str, np.ndarray]]:
    """`iterate`'s batches k at a time along a leading axis, each group
    gathered in one copy (what `sharding.stack_batches` would give)."""
    for index in self.stacked_indices(start_step, k):
      yield {"inputs": self._inputs[index], "label": self._labels[index]}

  def stacked_indices(self, start_step: int, k: int) -> Iterator[np.ndarray]:
    """The example indices of `iterate_stacked`'s groups: int32[k, local batch]
    (int64 for splits of 2^31 examples or more), this host's columns of k
    global batches."""
    n, size = self.examples_per_epoch, self.global_batch_size
    dtype = index_dtype(n)
    lo, hi = self._host_offset, self._host_offset + self.local_batch_size
    orders: dict[int, np.ndarray] = {}
    step = start_step
    while True:
      begin, end = step * size, (step + k) * size
      epochs = range(begin // n, (end - 1) // n + 1)
      orders = {e: orders.get(e) if e in orders else
                epoch_permutation(self._seed, e, n).astype(dtype)
                for e in epochs}
      stream = np.concatenate([orders[e] for e in epochs])
      offset = begin - epochs[0] * n
      yield stream[offset:offset + k * size].reshape(k, size)[:, lo:hi]
      step += k

  def examples(self) -> dict[str, np.ndarray]:
    """The whole split, the arrays `stacked_indices` index (shared, not copied)."""
    return {"inputs": self._inputs, "label": self._labels}

  @property
  def nbytes(self) -> int:
    return self._inputs.nbytes + self._labels.nbytes
