"""Input streams: order is a function of (seed, step), hosts are disjoint, evals exact."""

import functools
import itertools
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tests import helpers
from tests import tiny_workload
from tuning_playbook.common import stable_hash
from tuning_playbook import input_pipeline
from tuning_playbook.training import device_examples
from tuning_playbook.training import in_memory_stream
from tuning_playbook.training import sharding
from workloads import imagenet_data


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
  config = helpers.load_config(**{"data.data_dir": str(tmp_path_factory.mktemp("data"))})
  return tiny_workload.dataset_builder(config)


class JpegImages(tfds.core.GeneratorBasedBuilder):
  """Random photos of varied sizes, stored as JPEG like `imagenet2012`."""
  VERSION = tfds.core.Version("1.0.0")
  SIZES = {"train": 37, "validation": 9}

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=3), "index": np.int64}))

  def _split_generators(self, dl_manager):
    return {name: self._generate_examples(name) for name in self.SIZES}

  def _generate_examples(self, name):
    rng = np.random.default_rng(len(name))
    for i in range(self.SIZES[name]):
      shape = (*rng.integers(20, 60, size=2), 3)
      yield i, {"image": rng.integers(0, 256, shape, np.uint8),
                "label": i % 3, "index": i}


@pytest.fixture(scope="module")
def jpeg_builder(tmp_path_factory):
  builder = JpegImages(data_dir=str(tmp_path_factory.mktemp("jpeg")))
  builder.download_and_prepare()
  return builder


def _imagenet_preprocess(example, *, train, seed):
  out = imagenet_data.preprocess(example, train=train, seed=seed, image_size=16)
  return {**out, "index": example["index"]}


def _jpeg_stream(builder, preprocess=_imagenet_preprocess, batch=4):
  return input_pipeline.TrainStream(
      builder, "train", preprocess, seed=3, local_batch_size=batch,
      process_index=0, process_count=1, shuffle_buffer=1000, cache=False)


def _noisy_preprocess(example, *, train, seed):
  """Augmentation that depends on the per-example seed, as real ones do."""
  noise = tf.random.stateless_uniform([], seed=seed)
  return {"inputs": example["x"] + noise, "label": tf.cast(example["y"], tf.int32),
          "index": example["index"]}


def _tf_stream(builder, process_index=0, process_count=1, batch=16, seed=3):
  return input_pipeline.TrainStream(
      builder, "train", _noisy_preprocess, seed=seed, local_batch_size=batch,
      process_index=process_index, process_count=process_count, shuffle_buffer=1000)


def _memory_stream(builder, process_index=0, process_count=1, batch=16, seed=3):
  return in_memory_stream.InMemoryTrainStream(
      builder, "train", input_key="x", label_key="y", seed=seed,
      local_batch_size=batch, process_index=process_index,
      process_count=process_count)


def _take(stream, start, n):
  return list(itertools.islice(stream.iterate(start), n))


@pytest.mark.parametrize("make", [_tf_stream, _memory_stream])
def test_resuming_at_a_step_gives_the_same_batches(builder, make):
  stream = make(builder)
  full = _take(stream, 0, 40)  # 40 * 16 = 640 examples: over 3 epochs of 203.
  for start in (1, 12, 13, 25):
    resumed = _take(stream, start, 40 - start)
    for a, b in zip(full[start:], resumed):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_resuming_a_stream_of_jpeg_crops_gives_the_same_batches(jpeg_builder):
  stream = _jpeg_stream(jpeg_builder)
  full = _take(stream, 0, 24)  # 96 examples: over 2 epochs of 37.
  assert len({int(i) for b in full[:9] for i in b["index"]}) == 36
  for start in (1, 9, 10, 17):
    resumed = _take(stream, start, 24 - start)
    for a, b in zip(full[start:], resumed):
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def _recording_as_dataset(builder, monkeypatch):
  """Records the keyword arguments of each `builder.as_dataset` call."""
  calls = []
  as_dataset = builder.as_dataset

  def recording(**kwargs):
    calls.append(kwargs)
    return as_dataset(**kwargs)

  monkeypatch.setattr(builder, "as_dataset", recording)
  return calls


def test_jpeg_images_are_shuffled_encoded_and_cropped_from_the_bytes(
    jpeg_builder, monkeypatch):
  calls = _recording_as_dataset(jpeg_builder, monkeypatch)
  seen = []

  @input_pipeline.takes_encoded_images
  def preprocess(example, *, train, seed):
    seen.append(example["image"].dtype)
    return _imagenet_preprocess(example, train=train, seed=seed)

  batch = next(_jpeg_stream(jpeg_builder, preprocess).iterate(0))
  assert batch["inputs"].shape == (4, 16, 16, 3)
  assert seen == [tf.string]
  assert [type(c["decoders"]["image"]) for c in calls] == [tfds.decode.SkipDecoding]
  # The mark holds through the binding of a workload's preprocess to its config.
  features = input_pipeline.jpeg_image_features(jpeg_builder)
  assert list(features) == ["image"]
  bound = functools.partial(preprocess, config=None)
  assert input_pipeline.with_decoded_images(bound, features) is bound
  unmarked = functools.partial(lambda example, **kwargs: example, config=None)
  assert input_pipeline.with_decoded_images(unmarked, features) is not unmarked


def test_an_unmarked_preprocess_gets_the_images_tfds_decodes(jpeg_builder):
  def preprocess(example, *, train, seed):
    del train, seed
    return {"inputs": tf.image.resize_with_crop_or_pad(example["image"], 64, 64),
            "index": example["index"]}

  batch = next(_jpeg_stream(jpeg_builder, preprocess, batch=37).iterate(0))
  decoded = {int(ex["index"]): ex["image"] for ex in tfds.as_numpy(
      jpeg_builder.as_dataset(split="train", shuffle_files=False))}
  for index, inputs in zip(batch["index"], batch["inputs"]):
    image = decoded[int(index)]
    expected = tf.image.resize_with_crop_or_pad(image, 64, 64).numpy()
    np.testing.assert_array_equal(inputs, expected)


def test_every_example_once_per_epoch_and_epochs_reshuffled(builder):
  stream = _tf_stream(builder, batch=7)  # 203 = 29 * 7
  batches = _take(stream, 0, 58)
  epoch0 = np.concatenate([b["index"] for b in batches[:29]])
  epoch1 = np.concatenate([b["index"] for b in batches[29:]])
  assert sorted(epoch0) == list(range(203)) == sorted(epoch1)
  assert not np.array_equal(epoch0, epoch1)
  memory = _memory_stream(builder, batch=7)
  order = [in_memory_stream.epoch_permutation(memory._seed, e, 203) for e in (0, 1)]
  assert sorted(order[0]) == list(range(203)) == sorted(order[1])
  assert not np.array_equal(order[0], order[1])


def test_tf_stream_hosts_read_disjoint_shards_covering_the_split(builder):
  indices = []
  for host in range(2):
    stream = _tf_stream(builder, process_index=host, process_count=2, batch=1)
    batches = _take(stream, 0, stream.examples_per_epoch)
    indices.append([int(b["index"][0]) for b in batches])
  assert len(indices[0]) + len(indices[1]) == 203
  assert not set(indices[0]) & set(indices[1])
  assert set(indices[0]) | set(indices[1]) == set(range(203))


@pytest.mark.parametrize("num_hosts", [2, 4])
def test_memory_stream_global_batches_do_not_depend_on_host_count(builder, num_hosts):
  one = _take(_memory_stream(builder, batch=16), 5, 30)
  hosts = [_take(_memory_stream(builder, process_index=i, process_count=num_hosts,
                                batch=16 // num_hosts), 5, 30) for i in range(num_hosts)]
  for step in range(30):
    for key in ("inputs", "label"):
      joined = np.concatenate([h[step][key] for h in hosts])
      np.testing.assert_array_equal(joined, one[step][key])


def test_host_seeds_differ_and_are_stable():
  assert input_pipeline.host_seed(0, 0) != input_pipeline.host_seed(0, 1)
  assert input_pipeline.host_seed(0, 0) != input_pipeline.host_seed(1, 0)
  # Golden values: the data order of a seed must not change between releases.
  assert input_pipeline.host_seed(5, 1) == 957724038507805293
  np.testing.assert_array_equal(in_memory_stream.epoch_permutation(1234, 7, 10),
                                [3, 1, 6, 4, 8, 9, 0, 2, 7, 5])
  np.testing.assert_array_equal(in_memory_stream.epoch_permutation(0, 0, 10),
                                [1, 5, 8, 2, 6, 4, 7, 0, 3, 9])


@pytest.mark.parametrize("process_count,num_batches,padding", [
    (1, 8, 3),  # 61 examples in 8 batches of 8.
    (2, 4, 3),  # 31 + 30 examples: 4 batches of 8 on each host.
    (3, 3, 11)])  # 21 + 20 + 20 examples: 3 batches of 8 on each host.
def test_eval_splits_pad_with_zero_weight_and_equal_batch_counts(
    builder, process_count, num_batches, padding):
  splits = [input_pipeline.make_eval_split(
      builder, "validation", "validation", _noisy_preprocess, local_batch_size=8,
      process_index=i, process_count=process_count) for i in range(process_count)]
  assert [len(list(s.batches())) for s in splits] == [num_batches] * process_count
  assert {s.num_batches for s in splits} == {num_batches}
  seen, weights = [], []
  for s in splits:
    for batch in s.batches():
      assert batch["inputs"].shape[0] == 8
      assert batch["weight"].dtype == np.float32
      seen.extend(batch["index"][batch["weight"] == 1])
      weights.extend(batch["weight"])
  assert sorted(seen) == list(range(61))
  # Every row weighs 1 (an example) or 0 (padding), nothing in between.
  assert sorted(weights) == [0.0] * padding + [1.0] * 61


def _plain_preprocess(example, *, train, seed):
  del train, seed
  return {"inputs": example["x"], "label": tf.cast(example["y"], tf.int32),
          "index": example["index"]}


def _examples(batches) -> list[tuple[int, tuple[float, ...]]]:
  return [(int(i), tuple(x)) for b in batches
          for i, x, w in zip(b["index"], b["inputs"], b["weight"]) if w]


@pytest.mark.parametrize("split,limit,parts", [
    ("train", 50, ["train[:50]"]), ("train[10:]", 500, ["train[10:]"]),
    ("train[:20]+validation", 30, ["train[:20]", "validation[:10]"])])
def test_train_subset_eval_reads_only_each_host_share(builder, monkeypatch,
                                                      split, limit, parts):
  """The first `limit` examples for any host count, each read by one host."""
  first = [(int(ex["index"]), tuple(ex["x"])) for part in parts
           for ex in tfds.as_numpy(builder.as_dataset(split=part))]
  calls = _recording_as_dataset(builder, monkeypatch)
  for process_count in (1, 2, 3):
    seen = []
    for i in range(process_count):
      calls.clear()
      eval_split = input_pipeline.make_eval_split(
          builder, "train", split, _plain_preprocess, local_batch_size=8,
          process_index=i, process_count=process_count, limit=limit)
      read = [input_pipeline.num_examples(builder, c["split"]) for c in calls]
      assert read == [eval_split.host_examples]
      # TFDS splits each part of a split evenly.
      assert abs(eval_split.host_examples - len(first) / process_count) < len(parts)
      assert eval_split.total_examples == len(first)
      seen.extend(_examples(eval_split.batches()))
    assert sorted(seen) == sorted(first)


def test_a_bucket_data_dir_makes_no_local_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for data_dir, default in [("gs://bucket/tfds", "~/tensorflow_datasets"),
                            ("", "s3://bucket/tfds")]:
    monkeypatch.setattr(tfds.core.constants, "DATA_DIR", default)
    config = helpers.load_config(**{"data.data_dir": data_dir})
    assert input_pipeline.prepare_dataset(lambda c: "prepared", config) == "prepared"
  assert os.listdir(tmp_path) == []
  config = helpers.load_config(**{"data.data_dir": str(tmp_path / "local")})
  input_pipeline.prepare_dataset(lambda c: "prepared", config)
  assert os.listdir(tmp_path / "local") == [".prepare.lock"]


def test_stacked_batches_and_transfer_grouping():
  batches = ({"x": np.full((2, 3), i)} for i in range(7))
  groups = list(sharding.stack_batches(batches, 3))
  assert len(groups) == 2
  np.testing.assert_array_equal(groups[1]["x"][:, 0, 0], [3, 4, 5])


@pytest.mark.parametrize("process_index,process_count,batch,k", [
    (0, 1, 16, 8), (1, 2, 8, 5), (0, 1, 250, 3)])
def test_index_transfers_name_the_batches_of_the_host_gather(
    builder, process_index, process_count, batch, k):
  stream = _memory_stream(builder, process_index, process_count, batch)
  examples = stream.examples()
  for start in (0, 7, 13):
    transfers = device_examples.transfers(stream, start, k, on_device=True)
    host = stream.iterate_stacked(start, k)
    for transfer, group in itertools.islice(zip(transfers, host), 6):
      assert list(transfer) == [device_examples.INDEX_KEY]
      index = transfer[device_examples.INDEX_KEY]
      assert index.dtype == np.int32 and index.shape == (k, batch)
      for key in ("inputs", "label"):
        np.testing.assert_array_equal(examples[key][index], group[key])


def test_examples_on_the_devices_gather_the_batches_in_the_step(builder):
  stream = _memory_stream(builder, 0, 1, 16)
  mesh = sharding.create_mesh()
  examples = device_examples.place(stream, mesh, max_mb=1e6)
  assert all(a.sharding.is_fully_replicated for a in examples.values())
  stacked = sharding.stacked_batch_sharding(mesh)
  pick = jax.jit(lambda b, e, t: device_examples.gather(
      {n: x[t] for n, x in b.items()}, e))
  transfers = device_examples.transfers(stream, 5, 4, on_device=True)
  host = stream.iterate_stacked(5, 4)
  for transfer, group in itertools.islice(zip(transfers, host), 3):
    on_devices = sharding.to_global(transfer, stacked)
    for t in range(4):
      batch = pick(on_devices, examples, t)
      assert batch["inputs"].sharding.is_equivalent_to(
          sharding.batch_sharding(mesh), batch["inputs"].ndim)
      for key in ("inputs", "label"):
        np.testing.assert_array_equal(np.asarray(batch[key]), group[key][t])


def test_only_small_in_memory_splits_go_on_the_devices(builder):
  stream = _memory_stream(builder, 0, 1, 16)
  size_mb = stream.nbytes / 2**20
  assert device_examples.holds_on_device(stream, max_mb=size_mb)
  assert not device_examples.holds_on_device(stream, max_mb=size_mb * 0.99)
  assert not device_examples.holds_on_device(stream, max_mb=0)
  assert not device_examples.holds_on_device(_tf_stream(builder), max_mb=1e6)
  # Batches pass through a step that has no examples on the devices.
  batch = {"inputs": np.ones((2, 3))}
  assert device_examples.gather(batch, {}) is batch


@pytest.mark.parametrize("process_index,process_count,batch,k", [
    (0, 1, 16, 8), (1, 2, 8, 5), (0, 1, 250, 3)])
def test_in_memory_groups_of_batches_are_the_batches_stacked(
    builder, process_index, process_count, batch, k):
  # Groups span epochs of 203 examples, and a batch of 250 spans two.
  stream = _memory_stream(builder, process_index, process_count, batch)
  for start in (0, 7, 13):
    stacked = list(itertools.islice(stream.iterate_stacked(start, k), 6))
    one_by_one = _take(stream, start, 6 * k)
    for g, group in enumerate(stacked):
      for key in ("inputs", "label"):
        assert group[key].shape[:2] == (k, batch)
        np.testing.assert_array_equal(
            group[key], np.stack([b[key] for b in one_by_one[g * k:(g + 1) * k]]))


def test_epoch_order_breaks_score_ties_by_example_index(monkeypatch):
  # Real scores are 64-bit hashes and nearly never tie; force ties.
  scores = (np.arange(1000, dtype=np.uint64) * 7919) % 97
  assert not np.array_equal(np.argsort(scores), np.argsort(scores, kind="stable"))
  monkeypatch.setattr(stable_hash, "hash64", lambda seed, epoch, index: scores[index])
  order = in_memory_stream.epoch_permutation(0, 0, 1000)
  assert order.tolist() == sorted(range(1000), key=lambda i: (scores[i], i))


def test_indices_are_int32_unless_the_split_needs_int64():
  assert in_memory_stream.index_dtype(203) == np.int32
  assert in_memory_stream.index_dtype(2**31) == np.int32  # Largest index 2^31 - 1.
  assert in_memory_stream.index_dtype(2**31 + 1) == np.int64
