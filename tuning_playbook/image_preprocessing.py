"""Stateless Inception-style image augmentation and center crops for tf.data.

Training images get a random crop of 8% to 100% of the image area with an
aspect ratio in [3/4, 4/3], resized to `size` x `size`, and a random
horizontal flip (Szegedy et al. 2015; He et al. 2016); when no such crop is
found, the center crop. Evaluation images keep the central square of side
`crop_fraction` x the shorter side (224 of 256), resized to `size`. Every
random choice is drawn from the stateless `seed` a workload's `preprocess`
receives, so augmentation is the same after a resume.

An image is either decoded (uint8 [height, width, channels]) or the encoded
bytes of a JPEG (a tf.string scalar, as the input pipeline gives it to a
preprocess marked `input_pipeline.takes_encoded_images`). From bytes only the
crop window is decoded (`tf.io.decode_and_crop_jpeg`, as the Flax ImageNet
example and big_vision do): the window is chosen from the shape in the JPEG
header, so both forms of an image get the same crop.

  @input_pipeline.takes_encoded_images
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


def is_encoded(image: tf.Tensor) -> bool:
  """Whether `image` holds encoded bytes rather than pixels."""
  return image.dtype == tf.string


def image_shape(image: tf.Tensor) -> tf.Tensor:
  """[height, width, channels] (int32), from the JPEG header for bytes."""
  if is_encoded(image):
    return tf.io.extract_jpeg_shape(image)
  return tf.shape(image)


def crop(image: tf.Tensor, window: tf.Tensor) -> tf.Tensor:
  """The pixels of `window` = [top, left, height, width] (uint8 for bytes).

  Bytes are decoded to 3 channels, and only as far as the window needs.
  """
  if is_encoded(image):
    return tf.io.decode_and_crop_jpeg(image, window, channels=3)
  top, left, height, width = tf.unstack(window)
  return tf.slice(image, tf.stack([top, left, 0]), tf.stack([height, width, -1]))


def _resize(image: tf.Tensor, height, width) -> tf.Tensor:
  # Antialiasing matters when shrinking a whole photo to 224; its kernel has
  # no negative lobes, so pixels stay in [0, 255].
  return tf.image.resize(image, tf.stack([height, width]), method="bilinear",
                         antialias=True)


def _channels(image: tf.Tensor) -> int:
  return 3 if is_encoded(image) else image.shape[-1]


def center_crop_window(shape: tf.Tensor,
                       crop_fraction: float = CROP_FRACTION) -> tf.Tensor:
  """[top, left, side, side] of the central square of side
  `crop_fraction` x the shorter side of an image of `shape`."""
  height, width = shape[0], shape[1]
  shorter = tf.cast(tf.minimum(height, width), tf.float32)
  side = tf.maximum(tf.cast(crop_fraction * shorter, tf.int32), 1)
  return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])


def random_crop_window(shape: tf.Tensor, seed: tf.Tensor, *,
                       area_range: Sequence[float] = (0.08, 1.0),
                       aspect_ratio_range: Sequence[float] = (3 / 4, 4 / 3),
                       max_attempts: int = 10) -> tf.Tensor:
  """[top, left, height, width] of a crop of random area and aspect ratio.

  Falls back to `center_crop_window` when `max_attempts` draws find no crop
  that fits (the sampler then returns the whole image).
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=seed, min_object_covered=area_range[0],
      aspect_ratio_range=aspect_ratio_range, area_range=area_range,
      max_attempts=max_attempts, use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  whole = tf.reduce_all(tf.equal(size[:2], shape[:2]))
  return tf.where(whole, center_crop_window(shape), window)


def random_resized_crop(image: tf.Tensor, seed: tf.Tensor, size: int, *,
                        area_range: Sequence[float] = (0.08, 1.0),
                        aspect_ratio_range: Sequence[float] = (3 / 4, 4 / 3),
                        max_attempts: int = 10) -> tf.Tensor:
  """The crop of `random_crop_window`, resized to `size` x `size`.

  Returns float32 pixels in the input's range.
  """
  window = random_crop_window(
      image_shape(image), seed, area_range=area_range,
      aspect_ratio_range=aspect_ratio_range, max_attempts=max_attempts)
  resized = _resize(crop(image, window), size, size)
  return tf.ensure_shape(resized, [size, size, _channels(image)])


def inception_crop_and_flip(image: tf.Tensor, seed: tf.Tensor,
                            size: int) -> tf.Tensor:
  """`random_resized_crop`, then a random horizontal flip (float32)."""
  crop_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=2))
  image = random_resized_crop(image, crop_seed, size)
  return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def center_crop(image: tf.Tensor, size: int,
                crop_fraction: float = CROP_FRACTION) -> tf.Tensor:
  """The crop of `center_crop_window`, resized to `size` x `size`.

  Returns float32 pixels in the input's range.
  """
  window = center_crop_window(image_shape(image), crop_fraction)
  resized = _resize(crop(image, window), size, size)
  return tf.ensure_shape(resized, [size, size, _channels(image)])


def normalize(image: tf.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> tf.Tensor:
  """[0, 255] pixels to zero-mean, unit-variance channels (float32)."""
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(mean)) / tf.constant(std)
