"""Stateless Inception-style image augmentation and center crops for tf.data.

Training images get a random crop of 8% to 100% of the image area with an
aspect ratio in [3/4, 4/3], resized to `size` x `size`, and a random
horizontal flip (Szegedy et al. 2015; He et al. 2016). Evaluation images are
resized so the shorter side is `size / crop_fraction` (256 for 224) and
center-cropped. Every random choice is drawn from the stateless `seed` a
workload's `preprocess` receives, so augmentation is the same after a resume.

  def preprocess(example, *, train, seed):
    image = example["image"]
    image = (image_preprocessing.inception_crop_and_flip(image, seed, 224)
             if train else image_preprocessing.center_crop(image, 224))
    return {"inputs": image_preprocessing.normalize(image), "label": ...}
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

# Per-channel RGB mean and standard deviation of ImageNet, for [0, 1] pixels.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_FRACTION = 0.875  # 224 of 256.


def _resize(image: tf.Tensor, height, width) -> tf.Tensor:
  # Antialiasing matters when shrinking a whole photo to 224; its kernel has
  # no negative lobes, so pixels stay in [0, 255].
  return tf.image.resize(image, tf.stack([height, width]), method="bilinear",
                         antialias=True)


def random_resized_crop(image: tf.Tensor, seed: tf.Tensor, size: int, *,
                        area_range: Sequence[float] = (0.08, 1.0),
                        aspect_ratio_range: Sequence[float] = (3 / 4, 4 / 3),
                        max_attempts: int = 10) -> tf.Tensor:
  """A crop of random area and aspect ratio, resized to `size` x `size`.

  Falls back to the whole image when `max_attempts` draws find no crop that
  fits. Returns float32 pixels in the input's range.
  """
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=seed, min_object_covered=area_range[0],
      aspect_ratio_range=aspect_ratio_range, area_range=area_range,
      max_attempts=max_attempts, use_image_if_no_bounding_boxes=True)
  return _resize(tf.slice(image, begin, crop_size), size, size)


def inception_crop_and_flip(image: tf.Tensor, seed: tf.Tensor,
                            size: int) -> tf.Tensor:
  """`random_resized_crop`, then a random horizontal flip (float32)."""
  crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=2))
  image = random_resized_crop(image, crop_seed, size)
  return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def center_crop(image: tf.Tensor, size: int,
                crop_fraction: float = CROP_FRACTION) -> tf.Tensor:
  """Resizes the shorter side to `size / crop_fraction`, crops the center.

  Returns float32 pixels in the input's range, `size` x `size`.
  """
  shape = tf.shape(image)
  height = tf.cast(shape[0], tf.float32)
  width = tf.cast(shape[1], tf.float32)
  scale = size / crop_fraction / tf.minimum(height, width)
  new_height = tf.maximum(tf.cast(tf.round(height * scale), tf.int32), size)
  new_width = tf.maximum(tf.cast(tf.round(width * scale), tf.int32), size)
  image = _resize(image, new_height, new_width)
  top = (new_height - size) // 2
  left = (new_width - size) // 2
  crop = image[top:top + size, left:left + size]
  return tf.ensure_shape(crop, [size, size, image.shape[-1]])


def normalize(image: tf.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> tf.Tensor:
  """[0, 255] pixels to zero-mean, unit-variance channels (float32)."""
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(mean)) / tf.constant(std)
