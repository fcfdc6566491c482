"""Images/s of the ImageNet training input: decode then crop vs crop from bytes.

  python benchmarks/input_throughput.py [--num_images=512] [--batch_size=64] \
      [--chunks_per_round=2] [--rounds=3]

Writes a local TFDS data set of `--num_images` photo-like images of ImageNet's
typical size (about 400 x 350), stored as JPEG like `imagenet2012`, in a
temporary directory (no download), then times two training pipelines over it,
alternating round by round:

  before: TFDS decodes every image in full, the shuffle buffer holds the
      decoded images, and the crop is cut out of the whole image (the
      pipeline before decoding moved after the shuffle).
  after: `input_pipeline.TrainStream` with the ImageNet workloads'
      preprocess: the shuffle buffer holds the JPEG bytes, and only the random
      crop is decoded (`tf.io.decode_and_crop_jpeg`).

Both apply the same random crops (the same seed and per-example seeds), flip
and normalization at 224 x 224, with the ImageNet configs' shuffle buffer
(clamped to the data set, as the stream does) and all host cores. TFDS's
in-memory cache of small data sets is off, as it is for ImageNet. A round
resumes each pipeline at a new step in the middle of an epoch, times its
first chunk of 8 batches (what the stream yields at once; the shuffle buffer
fills and the skipped examples pass first), then `--chunks_per_round` more.
Prints the images/s of each round; the medians of the seconds to the first
chunk, of the CPU time per image (less moved by other load on a shared
machine) and of images/s; and last `ratio=<after / before>`, the median over
rounds of each round's images/s ratio.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tuning_playbook import input_pipeline
from workloads import imagenet_data

_NUM_IMAGES = flags.DEFINE_integer("num_images", 512, "Images in the data set.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per batch.")
_CHUNKS = flags.DEFINE_integer("chunks_per_round", 2,
                               "Timed chunks of 8 batches per round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds of each pipeline.")
_SHUFFLE_BUFFER = 10_000  # configs/imagenet_resnet50.py and imagenet_vit.py.
_IMAGE_SIZE = 224
_SEED = 0


def photo_like_images(count: int, seed: int = 0):
  """Smooth random colour fields with grain, ~400 x 350, as JPEG bytes.

  Uniform noise would compress and decode unlike photos.
  """
  rng = np.random.default_rng(seed)
  grain = rng.normal(0, 28, (512, 512, 3)).astype(np.float32)
  for _ in range(count):
    height, width = rng.integers(300, 400), rng.integers(350, 450)
    coarse = rng.uniform(0, 255, (height // 40 + 2, width // 40 + 2, 3))
    image = tf.image.resize(coarse.astype(np.float32), (height, width),
                            method="bicubic").numpy()
    top, left = rng.integers(0, 512 - height), rng.integers(0, 512 - width)
    image += grain[top:top + height, left:left + width]
    pixels = np.clip(image, 0, 255).astype(np.uint8)
    yield tf.io.encode_jpeg(pixels, quality=90).numpy()


class PhotoLikeImages(tfds.core.GeneratorBasedBuilder):
  """A local stand-in for `imagenet2012`: JPEG images and labels."""
  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, num_images: int, **kwargs):
    self._num_images = num_images
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=1000)}))

  def _should_cache_ds(self, *args, **kwargs) -> bool:
    # TFDS would keep this small data set in memory, decoded, after one
    # epoch; ImageNet is far too big for that.
    return False

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, image in enumerate(photo_like_images(self._num_images)):
      yield i, {"image": image, "label": i % 1000}


@input_pipeline.takes_encoded_images
def preprocess(example, *, train, seed):
  return imagenet_data.preprocess(example, train=train, seed=seed,
                                  image_size=_IMAGE_SIZE)


def decoded_stream_dataset(builder, stream: input_pipeline.TrainStream,
                           start_step: int):
  """The stream's pipeline as it was: TFDS decodes, decoded images shuffled."""
  base = builder.as_dataset(split="train", shuffle_files=False)
  buffer = min(_SHUFFLE_BUFFER, stream.examples_per_epoch)
  seed = tf.constant(input_pipeline.host_seed(_SEED, 0), tf.int64)
  position = stream.position(start_step)

  def one_epoch(epoch):
    epoch_seed = tf.bitwise.bitwise_xor(seed, epoch * 2654435761)
    return base.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)

  ds = tf.data.Dataset.range(position.epoch, 1 << 31).flat_map(one_epoch)
  ds = ds.skip(position.offset_in_epoch)
  ds = ds.enumerate(start=start_step * stream.local_batch_size)
  ds = ds.map(lambda i, ex: preprocess(ex, train=True, seed=tf.stack([seed, i])),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(stream.local_batch_size * 8, drop_remainder=True)
  return ds.prefetch(2)


def timed_chunks(dataset, chunks: int) -> dict[str, float]:
  """Seconds to the first chunk of batches, then images/s and CPU ms per
  image over the next `chunks` chunks.

  CPU time counts every thread of this process: on a shared machine it
  moves less than wall time with the other processes' load.
  """
  start = time.perf_counter()
  iterator = iter(dataset)
  images = len(next(iterator)["label"]) * chunks
  first = time.perf_counter() - start
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(chunks):
    next(iterator)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  return {"first_chunk_s": first, "images_per_s": images / wall,
          "cpu_ms_per_image": 1e3 * cpu / images}


def _median(rounds: list[dict[str, float]], key: str) -> float:
  return statistics.median(r[key] for r in rounds)


def main(argv):
  del argv
  input_pipeline.hide_accelerators_from_tensorflow()
  batch, chunks = _BATCH.value, _CHUNKS.value
  with tempfile.TemporaryDirectory() as data_dir:
    start = time.perf_counter()
    builder = PhotoLikeImages(num_images=_NUM_IMAGES.value, data_dir=data_dir)
    builder.download_and_prepare()
    prepared = time.perf_counter() - start
    stream = input_pipeline.TrainStream(
        builder, "train", preprocess, seed=_SEED, local_batch_size=batch,
        process_index=0, process_count=1, shuffle_buffer=_SHUFFLE_BUFFER,
        cache=False)
    pipelines = {"before": lambda step: decoded_stream_dataset(builder, stream, step),
                 "after": stream.dataset}
    rounds = {name: [] for name in pipelines}
    half_epoch = stream.examples_per_epoch // (2 * batch)
    for i in range(_ROUNDS.value):
      step = half_epoch + i * chunks * 8  # A resume in the middle of an epoch.
      # Alternate which pipeline goes first, so neither always follows the other.
      for name in sorted(pipelines, reverse=i % 2 == 1):
        rounds[name].append(timed_chunks(pipelines[name](step), chunks))
  before, after = rounds["before"], rounds["after"]
  ratio = statistics.median(a["images_per_s"] / b["images_per_s"]
                            for a, b in zip(after, before))
  print(f"images={_NUM_IMAGES.value} (JPEG, ~400x350, prepared in {prepared:.1f} s) "
        f"batch_size={batch} chunks_per_round={chunks} (x8 batches) "
        f"rounds={_ROUNDS.value} image_size={_IMAGE_SIZE}")
  for name, text in [("before", "decode in full, then crop"),
                     ("after", "crop from the JPEG bytes")]:
    print(f"{name} ({text}) images/s per round: "
          + " ".join(f"{r['images_per_s']:.1f}" for r in rounds[name]))
  for key, text, unit in [
      ("first_chunk_s", "seconds to the first chunk, resumed mid-epoch", ".2f"),
      ("cpu_ms_per_image", "CPU ms per image", ".2f"),
      ("images_per_s", "images/s", ".1f")]:
    print(f"median {text}: before {_median(before, key):{unit}}, "
          f"after {_median(after, key):{unit}}")
  print(f"ratio={ratio:.3f}")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
