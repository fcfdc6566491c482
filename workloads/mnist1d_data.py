"""MNIST-1D as a local TFDS data set, generated procedurally (no download).

Greydanus (2020), "Scaling down deep learning": 10 one-dimensional digit
templates, padded, translated, scaled, sheared and noised into 40-long
sequences. `mnist1d.data.make_dataset` with the published arguments (seed 42)
reproduces the published 4000 train / 1000 test examples; the validation split
is the test part of the same procedure run with another seed, so it is
independent of both.

  builder = mnist1d_data.builder(data_dir=None)
  ds = builder.as_dataset(split="train")  # {"x": float32[40], "y": int64}
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

from etils import epath
import jax
import numpy as np
import tensorflow_datasets as tfds

PUBLISHED_SEED = 42
VALIDATION_SEED = 43
NUM_CLASSES = 10
SEQUENCE_LENGTH = 40


@contextlib.contextmanager
def _preserved_global_rng():
  """`mnist1d` seeds the global `random`/`np.random` state; restore it after."""
  np_state, py_state = np.random.get_state(), random.getstate()
  try:
    yield
  finally:
    np.random.set_state(np_state)
    random.setstate(py_state)


def generate(seed: int) -> dict[str, np.ndarray]:
  """Runs the MNIST-1D generator with the published arguments and `seed`."""
  import mnist1d.data  # pylint: disable=g-import-not-at-top
  args = mnist1d.data.get_dataset_args()
  args.seed = seed
  with _preserved_global_rng():
    data = mnist1d.data.make_dataset(args)
  return {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}


class Mnist1d(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """MNIST-1D: 4000 train, 1000 validation, 1000 test sequences of length 40."""

  VERSION = tfds.core.Version("1.0.0")
  # TFDS finds this file with `importlib_resources`, which it only requires
  # (and so only has) on Python < 3.9.
  code_path = epath.Path(__file__)
  RELEASE_NOTES = {"1.0.0": "Published data (seed 42) plus a seed-43 validation split."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "x": tfds.features.Tensor(shape=(SEQUENCE_LENGTH,), dtype=np.float32),
            "y": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=("x", "y"),
        homepage="https://github.com/greydanus/mnist1d",
        citation="Greydanus, S. (2020). Scaling down deep learning. "
                 "arXiv:2011.14439.",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    published = generate(PUBLISHED_SEED)
    validation = generate(VALIDATION_SEED)
    return {
        "train": self._generate_examples(published["x"], published["y"]),
        "test": self._generate_examples(published["x_test"], published["y_test"]),
        "validation": self._generate_examples(validation["x_test"],
                                              validation["y_test"]),
    }

  def _generate_examples(self, xs, ys):
    for i, (x, y) in enumerate(zip(xs, ys)):
      yield i, {"x": x.astype(np.float32), "y": int(y)}


def synthetic_spec() -> dict[str, Any]:
  """Shapes of an example for `config.data.synthetic` (workload interface)."""
  return {"inputs": jax.ShapeDtypeStruct((SEQUENCE_LENGTH,), np.float32),
          "label": jax.ShapeDtypeStruct((), np.int32), "num_classes": NUM_CLASSES}


def builder(data_dir: str | None) -> tfds.core.DatasetBuilder:
  """Returns the prepared MNIST-1D builder; "" or None means TFDS's default dir.

  Safe to call from several processes at once (parallel trials): the data is
  deterministic, so when another process finishes preparing it first, its copy
  is used.
  """
  download_config = tfds.download.DownloadConfig(try_download_gcs=False)
  mnist1d_builder = Mnist1d(data_dir=data_dir or None)
  try:
    mnist1d_builder.download_and_prepare(download_config=download_config)
  except FileExistsError:
    mnist1d_builder = Mnist1d(data_dir=data_dir or None)
    mnist1d_builder.download_and_prepare(download_config=download_config)
  return mnist1d_builder
