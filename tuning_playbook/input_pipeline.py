"""Host-sharded tf.data input pipelines whose order is a function of (seed, step).

Each host reads a disjoint shard of every split (`tfds.split_for_jax_process`)
and yields numpy batches of its local share of the global batch. The training
stream is a concatenation of epochs, each shuffled with a seed derived from
(seed, host, epoch), and example k of the host's stream is augmented with the
stateless seed (host seed, k). Resuming at step s therefore needs no iterator
state: the stream restarts at position s * local_batch_size.

Eval batches are padded with zero-weight rows, and every host yields the same
number of batches, so global eval metrics are exact for every host count.

JPEG image features are read undecoded (`tfds.decode.SkipDecoding`): the
shuffle buffer and cache hold the bytes, and a resumed stream skips examples
without decoding them. A workload's `preprocess` marked
`takes_encoded_images` gets the bytes and decodes only its crop
(`image_preprocessing`); any other gets the image decoded as TFDS would.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import os
from typing import Any, Callable, Iterator

import numpy as np

# Upper bound on epochs in a training stream; the loop stops long before.
_MAX_EPOCHS = 1 << 31
_BATCHES_PER_CHUNK = 8


def hide_accelerators_from_tensorflow() -> None:
  """tf.data runs on the host: TensorFlow must not claim accelerator memory.

  Call before anything starts TensorFlow's runtime (tf.data, summary writers).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except RuntimeError:  # Already started by another library: too late to hide.
      pass


def is_local_path(path: str) -> bool:
  """False for URLs (gs://, s3://, ...), which no local lock can guard."""
  return "://" not in path


def prepare_dataset(dataset_builder: Callable[[Any], Any], config) -> Any:
  """Calls a workload's `dataset_builder` holding an exclusive file lock.

  Trials of a study, and the processes of a job on one machine, may prepare
  the same TFDS data set at once; TFDS would then race on renaming its
  directories. The lock lives in a local data directory. A data directory
  in a bucket (`gs://...`, the norm on Cloud TPU) gets no lock: prepare
  data there once ahead of time (`tfds build`), and the builder only reads.
  """
  import fcntl  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = config.data.data_dir or tfds.core.constants.DATA_DIR
  if not is_local_path(data_dir):
    return dataset_builder(config)
  data_dir = os.path.expanduser(data_dir)
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, ".prepare.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      return dataset_builder(config)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _tf():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  hide_accelerators_from_tensorflow()
  return tf


def host_seed(seed: int, process_index: int) -> int:
  """A 63-bit seed for a host's data stream, stable across NumPy versions."""
  state = np.random.SeedSequence([seed, process_index, 0x7D47A]).generate_state(2)
  return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


@dataclasses.dataclass(frozen=True)
class DataPosition:
  """Where a host's training stream stands at a given step (portable JSON)."""
  step: int
  epoch: int
  offset_in_epoch: int
  examples_per_epoch: int  # Of the stream: this host's shard, or the split.

  def to_json(self) -> dict[str, int]:
    return dataclasses.asdict(self)


def takes_encoded_images(preprocess: Callable[..., Any]) -> Callable[..., Any]:
  """Marks a workload's `preprocess` that decodes JPEG image features itself.

  It is then given each JPEG image feature as its encoded bytes (a tf.string
  scalar), which `image_preprocessing` crops before decoding. Unmarked
  functions get decoded images.

    @input_pipeline.takes_encoded_images
    def preprocess(example, *, train, seed): ...
  """
  preprocess.takes_encoded_images = True
  return preprocess


def _marked_encoded(preprocess: Callable[..., Any]) -> bool:
  while isinstance(preprocess, functools.partial):  # Bound to a config.
    preprocess = preprocess.func
  return getattr(preprocess, "takes_encoded_images", False)


def jpeg_image_features(builder) -> dict[str, Any]:
  """The top-level JPEG image features of `builder`'s examples, by name."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  features = builder.info.features
  if not isinstance(features, tfds.features.FeaturesDict):
    return {}
  return {name: feature for name, feature in features.items()
          if isinstance(feature, tfds.features.Image)
          and feature.encoding_format == "jpeg"}


def read_split(builder, split, jpeg_features: dict[str, Any]):
  """`split` in its stored order, with `jpeg_features` left encoded."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  decoders = {name: tfds.decode.SkipDecoding() for name in jpeg_features}
  return builder.as_dataset(split=split, shuffle_files=False,
                            decoders=decoders or None)


def with_decoded_images(preprocess: Callable[..., Any],
                        jpeg_features: dict[str, Any]) -> Callable[..., Any]:
  """`preprocess`, given decoded images unless it `takes_encoded_images`."""
  if not jpeg_features or _marked_encoded(preprocess):
    return preprocess
  tf = _tf()

  def decode_then_preprocess(example, **kwargs):
    example = dict(example)
    for name, feature in jpeg_features.items():
      if example[name].dtype == tf.string:  # Mock data may come decoded.
        example[name] = feature.decode_example(example[name])
    return preprocess(example, **kwargs)

  return decode_then_preprocess


def num_examples(builder, split) -> int:
  return int(builder.info.splits[split].num_examples)


def first_examples(builder, split: Any, count: int):
  """The TFDS split of the first `count` examples of `split`, taken from
  its parts (`train[:20]+validation`) in the order it names them."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  parts = []
  for part in tfds.core.ReadInstruction.from_spec(split).to_absolute(
      builder.info.splits):
    start = part.from_ or 0
    end = num_examples(builder, part.splitname) if part.to is None else part.to
    take = min(count, end - start)
    if take > 0:
      parts.append(tfds.core.ReadInstruction(
          part.splitname, from_=start, to=start + take, unit="abs"))
    count -= take
  return functools.reduce(operator.add, parts) if parts else split


def host_split_sizes(builder, split: Any, process_count: int) -> list[int]:
  """Number of examples of `split` on each host (TFDS even splits)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return [num_examples(builder, s)
          for s in tfds.even_splits(split, n=process_count)]


class TrainStream:
  """Infinite, resumable stream of local training batches (numpy dicts)."""

  def __init__(self, builder, split: str, preprocess: Callable[..., Any], *,
               seed: int, local_batch_size: int, process_index: int,
               process_count: int, shuffle_buffer: int, cache: bool = True):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self._builder = builder
    self._split = tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count)
    self._jpeg_features = jpeg_image_features(builder)
    self._preprocess = with_decoded_images(preprocess, self._jpeg_features)
    self._seed = host_seed(seed, process_index)
    self.local_batch_size = local_batch_size
    self._shuffle_buffer = shuffle_buffer
    self._cache = cache
    self.examples_per_epoch = num_examples(builder, self._split)
    # Every host's epoch length: what the data order depends on besides the seed.
    self.layout = host_split_sizes(builder, split, process_count)
    if self.examples_per_epoch == 0:
      raise ValueError(f"split {split!r} has no examples for host "
                       f"{process_index} of {process_count}")

  def position(self, step: int) -> DataPosition:
    start = step * self.local_batch_size
    return DataPosition(step=step, epoch=start // self.examples_per_epoch,
                        offset_in_epoch=start % self.examples_per_epoch,
                        examples_per_epoch=self.examples_per_epoch)

  def element_spec(self) -> tuple[tuple[int, ...], np.dtype]:
    """Shape (without batch) and dtype of the model inputs."""
    spec = self.dataset(0).element_spec["inputs"]
    return tuple(spec.shape[1:]), spec.dtype.as_numpy_dtype

  def dataset(self, start_step: int):
    """The tf.data pipeline of chunks of batches from `start_step` on."""
    tf = _tf()
    pos = self.position(start_step)
    # Shuffled, cached and skipped while encoded: decoding follows the skip.
    base = read_split(self._builder, self._split, self._jpeg_features)
    if self._cache:
      base = base.cache()
    buffer = min(self._shuffle_buffer, self.examples_per_epoch)
    seed = tf.constant(self._seed, tf.int64)

    def one_epoch(epoch):
      epoch_seed = tf.bitwise.bitwise_xor(seed, epoch * 2654435761)
      return base.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)

    ds = tf.data.Dataset.range(pos.epoch, _MAX_EPOCHS).flat_map(one_epoch)
    ds = ds.skip(pos.offset_in_epoch)
    ds = ds.enumerate(start=start_step * self.local_batch_size)

    def prepare(index, example):
      example_seed = tf.stack([seed, index])
      return self._preprocess(example, train=True, seed=example_seed)

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # Batches come in chunks: tf.data's per-element cost is paid once per chunk.
    ds = ds.batch(self.local_batch_size * _BATCHES_PER_CHUNK, drop_remainder=True)
    return ds.prefetch(2)

  def iterate(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    """Local batches from `start_step` on, in order."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    for chunk in tfds.as_numpy(self.dataset(start_step)):
      for i in range(_BATCHES_PER_CHUNK):
        lo = i * self.local_batch_size
        yield {k: v[lo:lo + self.local_batch_size] for k, v in chunk.items()}


@dataclasses.dataclass
class EvalSplit:
  """A padded, host-sharded eval split; every host yields `num_batches`."""
  name: str
  dataset: Any  # tf.data.Dataset of unbatched, preprocessed examples.
  local_batch_size: int
  num_batches: int
  host_examples: int
  total_examples: int

  def batches(self) -> Iterator[dict[str, np.ndarray]]:
    """Local batches with a float32 `weight` of 1 for real rows, 0 for padding."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    produced = 0
    template = None
    for batch in tfds.as_numpy(self.dataset.batch(self.local_batch_size)):
      template = batch
      yield _pad_batch(batch, self.local_batch_size)
      produced += 1
    if produced < self.num_batches:
      if template is None:
        template = self._empty_template()
      empty = {k: np.zeros((0,) + v.shape[1:], v.dtype) for k, v in template.items()}
      for _ in range(self.num_batches - produced):
        yield _pad_batch(empty, self.local_batch_size)

  def local_batch_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each array of this host's padded batches."""
    padded = _pad_batch(self._empty_template(), self.local_batch_size)
    return {k: (v.shape, v.dtype) for k, v in padded.items()}

  def _empty_template(self):
    spec = self.dataset.element_spec
    return {k: np.zeros((0,) + tuple(v.shape), v.dtype.as_numpy_dtype)
            for k, v in spec.items()}


def _pad_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  n = next(iter(batch.values())).shape[0]
  out = {}
  for key, value in batch.items():
    pad = np.zeros((size - n,) + value.shape[1:], value.dtype)
    out[key] = np.concatenate([value, pad]) if n < size else value
  weight = np.zeros((size,), np.float32)
  weight[:n] = 1.0
  out["weight"] = weight
  return out


def make_eval_split(builder, name: str, split: str, preprocess: Callable[..., Any],
                    *, local_batch_size: int, process_index: int,
                    process_count: int, limit: int = 0,
                    cache: bool = True) -> EvalSplit:
  """Shards `split` (its `first_examples` if limit > 0) over hosts.

  Each host reads only its share (TFDS even splits): the examples are the
  same for every host count.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tf = _tf()
  if limit:
    split = first_examples(builder, split, limit)
  host_split = tfds.split_for_jax_process(
      split, process_index=process_index, process_count=process_count)
  jpeg_features = jpeg_image_features(builder)
  ds = read_split(builder, host_split, jpeg_features)
  sizes = host_split_sizes(builder, split, process_count)
  total = sum(sizes)
  preprocess = with_decoded_images(preprocess, jpeg_features)
  zero_seed = tf.zeros([2], tf.int64)
  ds = ds.map(lambda ex: preprocess(ex, train=False, seed=zero_seed),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if cache:
    ds = ds.cache()
  num_batches = max(1, math.ceil(max(sizes) / local_batch_size))
  return EvalSplit(name=name, dataset=ds, local_batch_size=local_batch_size,
                   num_batches=num_batches, host_examples=sizes[process_index],
                   total_examples=total)
