"""ILSVRC-2012 (TFDS `imagenet2012`) as the ImageNet workloads read it.

TFDS cannot download ImageNet itself. Once: download `ILSVRC2012_img_train.tar`
and `ILSVRC2012_img_val.tar` from https://image-net.org (after accepting its
terms) into `<data_dir>/downloads/manual/` (`~/tensorflow_datasets/downloads/
manual/` for the default `config.data.data_dir`); the first run then prepares
the data set (hours, about 150 GB). `tfds build imagenet2012 --manual_dir=DIR`
does the same ahead of time.

Splits: the last 1% of the training images (12,812) are the validation split
that tuning decisions use; the 50,000 official validation images, on which
ImageNet accuracies are usually reported, are the test split.

Images reach `preprocess` as JPEG bytes, and only the crop is decoded
(`tuning_playbook/image_preprocessing.py`); a data directory in a bucket
(`--config.data.data_dir=gs://...`) is read in place.

The ImageNet workloads take their `preprocess`, `loss_fn` and `synthetic_spec`
from `workload_functions` (see tuning_playbook/workload.py).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
import tensorflow as tf
import tensorflow_datasets as tfds

from tuning_playbook import image_preprocessing
from tuning_playbook import input_pipeline

SPLITS = {"train": "train[:99%]", "validation": "train[99%:]",
          "test": "validation"}
TRAIN_EXAMPLES = 1_268_355  # In SPLITS["train"].
NUM_CLASSES = 1000


def dataset_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  builder = tfds.builder("imagenet2012", data_dir=config.data.data_dir or None)
  builder.download_and_prepare()
  return builder


@input_pipeline.takes_encoded_images
def preprocess(example: dict[str, tf.Tensor], *, train: bool, seed: tf.Tensor,
               image_size: int) -> dict[str, tf.Tensor]:
  """Inception crop and flip (train) or center crop (eval), then normalization.

  `example["image"]` is JPEG bytes or a decoded uint8 image.
  """
  image = example["image"]
  if train:
    image = image_preprocessing.inception_crop_and_flip(image, seed, image_size)
  else:
    image = image_preprocessing.center_crop(image, image_size)
  return {"inputs": image_preprocessing.normalize(image),
          "label": tf.cast(example["label"], tf.int32)}


def synthetic_spec(image_size: int, num_classes: int) -> dict[str, Any]:
  return {"inputs": jax.ShapeDtypeStruct((image_size, image_size, 3), jnp.float32),
          "label": jax.ShapeDtypeStruct((), jnp.int32), "num_classes": num_classes}


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array,
                           label_smoothing: float) -> jax.Array:
  """Per-example softmax cross-entropy (float32) against smoothed one-hot labels.

  The target puts `1 - label_smoothing` on the label and spreads
  `label_smoothing` evenly over all classes (Szegedy et al. 2016).
  """
  logits = logits.astype(jnp.float32)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]),
                                label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def workload_functions(
    model_config: Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict],
) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
  """`preprocess`, `loss_fn` and `synthetic_spec` of an ImageNet classifier.

  `model_config(config)` gives the workload's checked `config.model`, with the
  fields image_size, num_classes and label_smoothing. Training examples are
  augmented when `config.data.augment`.
  """

  @input_pipeline.takes_encoded_images
  def workload_preprocess(example, *, train: bool, seed,
                          config: ml_collections.ConfigDict):
    return preprocess(example, train=train and config.data.augment, seed=seed,
                      image_size=model_config(config).image_size)

  def workload_loss_fn(logits: jax.Array, labels: jax.Array, *,
                       config: ml_collections.ConfigDict) -> jax.Array:
    return smoothed_cross_entropy(logits, labels,
                                  model_config(config).label_smoothing)

  def workload_synthetic_spec(
      config: ml_collections.ConfigDict) -> dict[str, Any]:
    fields = model_config(config)
    return synthetic_spec(fields.image_size, fields.num_classes)

  return workload_preprocess, workload_loss_fn, workload_synthetic_spec
