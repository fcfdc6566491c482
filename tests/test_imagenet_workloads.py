"""ImageNet ResNet and ViT: preprocessing, models, loss, training on mock data."""

import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tests import helpers
from tuning_playbook.common import config_validation
from tuning_playbook import config_schema
from tuning_playbook import image_preprocessing
from tuning_playbook.training import train
from tuning_playbook import workload as workload_lib
from workloads import imagenet_data
from workloads import imagenet_resnet50
from workloads import imagenet_vit

CONFIGS = {name: os.path.join(helpers.REPO, "configs", f"{name}.py")
           for name in ("imagenet_resnet50", "imagenet_vit")}
MEAN = np.array(image_preprocessing.IMAGENET_MEAN, np.float32)
STD = np.array(image_preprocessing.IMAGENET_STD, np.float32)
# Tiny models: their programs compile in proportion to their size (ResNet-18,
# the least depth, at 1/16 width; ViT of one block).
TINY = {
    "imagenet_resnet50": {"model.depth": 18, "model.width_multiplier": 0.0625,
                          "model.num_classes": 10, "model.image_size": 32},
    "imagenet_vit": {"model.variant": "Ti/8", "model.hidden_size": 32,
                     "model.depth": 1, "model.num_heads": 2,
                     "model.mlp_dim": 64, "model.num_classes": 10,
                     "model.image_size": 32},
}


def tiny_config(name, **overrides):
  return helpers.load_config(CONFIGS[name], **{**TINY[name], **overrides})


def random_image(height, width, seed=0):
  rng = np.random.default_rng(seed)
  return tf.constant(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def coordinate_image(height, width):
  """Channel 0 holds the row, channel 1 the column of each pixel."""
  rows, cols = np.mgrid[:height, :width]
  return tf.constant(np.stack([rows, cols, np.zeros_like(rows)], -1), tf.float32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_configs_validate_and_match_the_recipe(name):
  config = helpers.load_config(CONFIGS[name])
  config_validation.validate(config)
  workload = train.validate_before_compiling(config)
  assert config.workload == name and workload.splits == imagenet_data.SPLITS
  # 90 epochs in all: the warmup is prepended to the decay's max_train_steps.
  total = math.ceil(90 * imagenet_data.TRAIN_EXAMPLES / config.batch_size)
  warmup = {"imagenet_resnet50": total * 5 // 90, "imagenet_vit": 10_000}[name]
  assert config.optimizer.warmup_mode == "prepended"
  assert config.optimizer.warmup_steps == warmup
  assert config.max_train_steps == total - warmup
  assert config_schema.total_train_steps(config) == total
  # A short run keeps the warmup's share (here none) and stays valid.
  config.max_train_steps = 3
  config_validation.validate(config)
  assert config_schema.total_train_steps(config) == 3
  spec = workload.synthetic_spec(config)
  assert spec["inputs"].shape == (224, 224, 3) and spec["num_classes"] == 1000


@pytest.mark.parametrize("train_mode", [True, False])
@pytest.mark.parametrize("height,width", [(6, 18), (300, 200), (64, 64)])
def test_preprocess_shapes_dtypes_and_range(train_mode, height, width):
  example = {"image": random_image(height, width), "label": tf.constant(7, tf.int64)}
  out = imagenet_data.preprocess(example, train=train_mode, image_size=32,
                                 seed=tf.constant([1, 2], tf.int64))
  image = out["inputs"].numpy()
  assert image.shape == (32, 32, 3) and image.dtype == np.float32
  assert out["label"].dtype == tf.int32 and int(out["label"]) == 7
  assert np.all(image >= -MEAN / STD - 1e-5)
  assert np.all(image <= (1 - MEAN) / STD + 1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_augmentation_switched_off_trains_on_center_crops(name):
  config = helpers.load_config(CONFIGS[name])
  config.model.image_size = 32
  workload = workload_lib.load_workload(config.workload, config)
  assert workload.regularization_off["data.augment"] is False
  example = {"image": random_image(48, 40), "label": tf.constant(3, tf.int64)}
  seed = tf.constant([4, 1], tf.int64)
  center = workload.preprocess(example, train=False, seed=seed)["inputs"].numpy()
  assert not np.array_equal(
      workload.preprocess(example, train=True, seed=seed)["inputs"].numpy(), center)
  config.data.augment = False
  workload = workload_lib.load_workload(config.workload, config)
  np.testing.assert_array_equal(
      workload.preprocess(example, train=True, seed=seed)["inputs"].numpy(), center)


def test_augmentation_is_a_seeded_crop_then_flip():
  image = random_image(48, 40)
  flips = set()
  for s in range(16):
    seed = tf.constant([s, 5], tf.int64)
    out = image_preprocessing.inception_crop_and_flip(image, seed, 24).numpy()
    np.testing.assert_array_equal(  # Same seed, same output.
        out, image_preprocessing.inception_crop_and_flip(image, seed, 24).numpy())
    crop_seed, _ = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    crop = image_preprocessing.random_resized_crop(image, crop_seed, 24).numpy()
    flipped = np.array_equal(out, crop[:, ::-1])
    assert flipped or np.array_equal(out, crop)
    flips.add(flipped)
  assert flips == {True, False}


def test_random_crops_cover_8_to_100_percent_with_bounded_aspect_ratio():
  size = 200
  image = coordinate_image(size, size)
  areas = []
  for s in range(24):
    crop = image_preprocessing.random_resized_crop(
        image, tf.constant([s, 0], tf.int64), 64).numpy()
    # The crop's rows and columns, up to the blur of resizing at its edges.
    height = crop[..., 0].max() - crop[..., 0].min() + 1
    width = crop[..., 1].max() - crop[..., 1].min() + 1
    areas.append(height * width / size**2)
    assert 0.07 <= areas[-1] <= 1.0
    assert 3 / 4 * 0.9 <= width / height <= 4 / 3 * 1.1
  assert min(areas) < 0.5 < max(areas)


def test_center_crop_geometry():
  # Shorter side already 256: no resizing, the central 224 x 224 is kept.
  for height, width in [(256, 320), (320, 256)]:
    image = coordinate_image(height, width)
    crop = image_preprocessing.center_crop(image, 224).numpy()
    top, left = (height - 224) // 2, (width - 224) // 2
    np.testing.assert_array_equal(crop, image[top:top + 224, left:left + 224])
  # Shorter side 128: its central 112 x 112, at (8, 24), upscaled 2x; the
  # outermost pixels see only the crop.
  crop = image_preprocessing.center_crop(coordinate_image(128, 160), 224).numpy()
  rows, cols = np.mgrid[:224, :224]
  inner = np.s_[1:-1, 1:-1]
  np.testing.assert_allclose(crop[..., 0][inner], ((rows + 0.5) / 2 + 7.5)[inner],
                             atol=1e-4)
  np.testing.assert_allclose(crop[..., 1][inner], ((cols + 0.5) / 2 + 23.5)[inner],
                             atol=1e-4)
  assert (crop[..., 0].min(), crop[..., 0].max()) == (8, 119)
  assert (crop[..., 1].min(), crop[..., 1].max()) == (24, 135)


def jpeg_bytes(image):
  return tf.io.encode_jpeg(image, quality=95)


def smooth_image(height, width, seed=0):
  """A photo-like image: JPEG keeps it close, unlike uniform noise."""
  rng = np.random.default_rng(seed)
  rows, cols = np.mgrid[:height, :width]
  phases = rng.uniform(0, 2 * np.pi, 3)
  channels = [128 + 100 * np.sin(rows / 9 + cols / 13 + p) for p in phases]
  return tf.constant(np.stack(channels, -1).astype(np.uint8))


@pytest.mark.parametrize("height,width", [(350, 400), (97, 61)])
def test_crops_from_jpeg_bytes_match_crops_of_the_decoded_image(height, width):
  encoded = jpeg_bytes(smooth_image(height, width))
  decoded = tf.io.decode_jpeg(encoded)
  for s in range(8):
    seed = tf.constant([s, 9], tf.int64)
    from_bytes = image_preprocessing.inception_crop_and_flip(encoded, seed, 32)
    from_pixels = image_preprocessing.inception_crop_and_flip(decoded, seed, 32)
    assert from_bytes.shape == (32, 32, 3) and from_bytes.dtype == tf.float32
    # The same window; decoding a window rounds its edge pixels differently.
    assert np.mean(np.abs(from_bytes.numpy() - from_pixels.numpy())) < 0.5
  for train_mode in (True, False):
    example = {"label": tf.constant(1, tf.int64)}
    out_bytes = imagenet_data.preprocess({**example, "image": encoded},
                                         train=train_mode, seed=seed, image_size=24)
    out_pixels = imagenet_data.preprocess({**example, "image": decoded},
                                          train=train_mode, seed=seed, image_size=24)
    assert np.mean(np.abs(out_bytes["inputs"] - out_pixels["inputs"])) < 0.01


def test_bytes_are_decoded_only_inside_the_crop_window():
  seed = tf.constant([0, 1], tf.int64)
  for fn in (lambda b: image_preprocessing.inception_crop_and_flip(b, seed, 32),
             lambda b: image_preprocessing.center_crop(b, 32)):
    graph = tf.function(fn).get_concrete_function(
        tf.TensorSpec([], tf.string)).graph
    ops = {op.type for op in graph.get_operations()}
    assert "DecodeAndCropJpeg" in ops and "ExtractJpegShape" in ops
    assert not ops & {"DecodeJpeg", "DecodeImage", "DecodePng"}


def test_random_crop_falls_back_to_the_center_crop():
  # No crop of 8% of a 2 x 200 image has an aspect ratio in [3/4, 4/3].
  shape = tf.constant([2, 200, 3])
  window = image_preprocessing.random_crop_window(shape, tf.constant([3, 4], tf.int64))
  np.testing.assert_array_equal(window, [1, 100, 1, 1])
  np.testing.assert_array_equal(
      window, image_preprocessing.center_crop_window(shape))


def num_params(model, image_size=224):
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False))
  return sum(math.prod(p.shape) for p in jax.tree.leaves(shapes["params"]))


def test_full_size_parameter_counts():
  resnet = imagenet_resnet50.create_model(
      helpers.load_config(CONFIGS["imagenet_resnet50"]))
  assert num_params(resnet) == 25_557_032  # torchvision's resnet50.
  vit = imagenet_vit.create_model(helpers.load_config(CONFIGS["imagenet_vit"]))
  assert 21.9e6 < num_params(vit) < 22.1e6  # ViT-S/16 with a linear head.


def test_label_smoothing_loss_is_the_hand_computation():
  config = helpers.load_config(CONFIGS["imagenet_resnet50"],
                               **{"model.label_smoothing": 0.1})
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)), jnp.bfloat16)
  labels = jnp.array([0, 4, 2])
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
  targets = 0.9 * jax.nn.one_hot(labels, 5) + 0.1 / 5
  expected = -jnp.sum(targets * log_p, axis=-1)
  loss = workload_lib.load_workload(config.workload, config).loss_fn(logits, labels)
  assert loss.shape == (3,) and loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  config.model.label_smoothing = 0.0
  np.testing.assert_allclose(
      imagenet_resnet50.loss_fn(logits, labels, config=config),
      -jnp.take_along_axis(log_p, labels[:, None], 1)[:, 0], rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_resnet_variables():
  """Variables of the tiny ResNet; every BatchNorm policy shares their shapes."""
  model = imagenet_resnet50.create_model(tiny_config("imagenet_resnet50"))
  # An "rbg" key: threefry's initializers take seconds longer to compile.
  return jax.jit(lambda: model.init(jax.random.key(0, impl="rbg"),
                                    jnp.zeros((1, 32, 32, 3)), train=False))()


@pytest.mark.parametrize("policy,group", [("global", 8), ("ghost", 4),
                                          ("per_device", 2)])
def test_resnet_batch_norm_groups_follow_the_policy(tiny_resnet_variables,
                                                     policy, group):
  assert jax.device_count() == 4  # tests/conftest.py: per_device groups of 2.
  model = imagenet_resnet50.create_model(tiny_config(
      "imagenet_resnet50", **{"batch_norm.policy": policy,
                              "batch_norm.virtual_batch_size": 4}))
  apply_train = jax.jit(lambda x: model.apply(
      tiny_resnet_variables, x, train=True, mutable=["batch_stats"]))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32)
  logits, state = apply_train(x)
  assert logits.shape == (8, 10) and bool(jnp.all(jnp.isfinite(logits)))
  assert not np.allclose(state["batch_stats"]["stem_norm"]["mean"], 0)
  # Other examples from the fifth on change the first ones' outputs only
  # when they share BatchNorm statistics with them.
  other = x.at[4:].set(jnp.asarray(rng.normal(size=(4, 32, 32, 3)) + 1.0))
  first = min(group, 4)
  unchanged = np.allclose(apply_train(other)[0][:first], logits[:first],
                          rtol=1e-4, atol=1e-4)
  assert unchanged == (group <= 4)


def test_resnet_blocks_start_as_identity_and_compute_in_bfloat16(
    tiny_resnet_variables):
  variables = tiny_resnet_variables
  blocks = [v for k, v in variables["params"].items() if k.startswith("Residual")]
  assert len(blocks) == 8  # ResNet-18.
  for block in blocks:  # The last BatchNorm of the residual branch: scale 0.
    assert not np.any(block["BatchNorm_1"]["scale"])
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  model = imagenet_resnet50.create_model(
      tiny_config("imagenet_resnet50", compute_dtype="bfloat16"))
  logits, state = jax.jit(lambda x: model.apply(
      variables, x, train=True, mutable=["batch_stats"]))(jnp.ones((2, 32, 32, 3)))
  assert logits.dtype == jnp.bfloat16
  assert {x.dtype for x in jax.tree.leaves(state)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("pool,posemb", [("gap", "sincos2d"), ("token", "learned")])
def test_vit_forward_dropout_and_bfloat16(pool, posemb):
  config = tiny_config("imagenet_vit", compute_dtype="bfloat16", **{
      "model.pool": pool, "model.posemb": posemb, "model.dropout_rate": 0.5})
  model = imagenet_vit.create_model(config)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  params = jax.jit(lambda: model.init(
      jax.random.key(0, impl="rbg"), x, train=False))()["params"]
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  assert ("cls" in params) == (pool == "token")
  assert ("pos_embedding" in params) == (posemb == "learned")
  assert params["embedding"]["kernel"].shape == (8, 8, 3, 32)  # Ti/8 at 32.
  assert not np.any(params["head"]["kernel"])
  params = jax.tree.map(lambda p: p + 0.01, params)  # A non-zero head.
  eval_logits, train_logits = jax.jit(lambda: (
      model.apply({"params": params}, x, train=False),
      model.apply({"params": params}, x, train=True,
                  rngs={"dropout": jax.random.key(1, impl="rbg")})))()
  assert eval_logits.shape == (2, 10) and eval_logits.dtype == jnp.bfloat16
  assert bool(jnp.all(jnp.isfinite(eval_logits)))
  assert not np.allclose(eval_logits, train_logits)  # Dropout is active.


@pytest.mark.parametrize("field,value", [
    ("variant", "M/16"), ("image_size", 36), ("num_heads", 5), ("pool", "cls")])
def test_vit_bad_model_fields_name_the_field(field, value):
  with pytest.raises(workload_lib.ModelConfigError,
                     match=rf"config\.model\.{field}="):
    imagenet_vit.create_model(tiny_config("imagenet_vit", **{f"model.{field}": value}))


SPLIT_SIZES = {"train": 100, "validation": 6}  # train[:99%]: 99 examples.


def _write_mock_metadata(data_dir):
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=name, shard_lengths=[n], num_bytes=0)
      for name, n in SPLIT_SIZES.items()]))
  os.makedirs(builder.data_dir)
  builder.info.write_to_directory(builder.data_dir)


def _mock_as_dataset(self, split, decoders=None, **kwargs):
  """JPEG images of varied sizes, as many as the (sliced) split holds; left
  encoded when `decoders` says so, as TFDS would."""
  del kwargs
  n = self.info.splits[split].num_examples
  encoded = isinstance((decoders or {}).get("image"), tfds.decode.SkipDecoding)
  mock_decoders.append(decoders)

  def examples():
    rng = np.random.default_rng(n)
    for i in range(n):
      height, width = rng.integers(8, 80, size=2)
      image = jpeg_bytes(rng.integers(0, 256, (height, width, 3), np.uint8))
      yield {"image": image if encoded else tf.io.decode_jpeg(image),
             "label": i % 10, "file_name": f"{i}.JPEG"}

  image_spec = (tf.TensorSpec((), tf.string) if encoded
                else tf.TensorSpec((None, None, 3), tf.uint8))
  return tf.data.Dataset.from_generator(examples, output_signature={
      "image": image_spec, "label": tf.TensorSpec((), tf.int64),
      "file_name": tf.TensorSpec((), tf.string)})


mock_decoders = []  # The `decoders` of each `_mock_as_dataset` call.


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.slow
def test_train_eval_checkpoint_and_resume_on_mock_imagenet(name, tmp_path, caplog):
  data_dir = str(tmp_path / "data")
  _write_mock_metadata(data_dir)
  config = tiny_config(name, **{
      "data.data_dir": data_dir, "batch_size": 8, "eval_batch_size": 8,
      "max_train_steps": 3, "eval_every_steps": 2, "log_every_steps": 2,
      "optimizer.warmup_steps": 1, "step_watchdog_seconds": 0.0,  # 4 in all.
      "compute_dtype": "float32"})
  workdir = str(tmp_path / "run")
  mock_decoders.clear()
  with tfds.testing.mock_data(data_dir=data_dir, as_dataset_fn=_mock_as_dataset,
                              policy=tfds.testing.MockPolicy.USE_FILES):
    # Interrupted after the eval and checkpoint at step 2, then resumed.
    trainer = train.Trainer([config], [workdir], [train.validate_before_compiling(config)])
    assert trainer.train(2) == [None]
    trainer.records[0].ckpt.wait()
    trainer.records[0].ckpt.close()
    with caplog.at_level(logging.INFO):
      summary = train.train_and_evaluate(config, workdir)
  assert "Resumed from checkpoint at step 2." in caplog.text
  # Every split, train and eval, was read with its JPEG images undecoded.
  assert mock_decoders and all(
      isinstance(d["image"], tfds.decode.SkipDecoding) for d in mock_decoders)
  assert summary["status"] == "completed" and summary["final_step"] == 4
  rows = helpers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [2, 4]
  for row in rows:
    assert math.isfinite(row["train/loss"])
    # validation: train[99%:]; train: a subset of its size; test: validation.
    for split, size in [("validation", 1), ("train", 1), ("test", 6)]:
      assert row[f"eval/{split}/num_examples"] == size
      assert math.isfinite(row[f"eval/{split}/loss"])
