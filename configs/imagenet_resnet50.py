r"""ImageNet, ResNet-50 v1.5, Nesterov momentum: about 76.5-77% top-1.

  python -m tuning_playbook.main --config=configs/imagenet_resnet50.py \
      --workdir=/tmp/imagenet_resnet50

Needs accelerators, and ImageNet prepared by TFDS from a manual download (see
workloads/imagenet_data.py); `--config.data.synthetic=True` runs without it,
to measure throughput. The recipe of Goyal et al. (2017) with the cosine decay
and label smoothing of He et al. (2019): batch 1024, Nesterov momentum 0.9,
peak learning rate 0.4 (0.1 x batch / 256) after 5 epochs of linear warmup
(6193 steps) prepended to 85 epochs of cosine decay to 0 (max_train_steps =
105,284): 90 epochs in all (111,477 steps over the 1,268,355 training images), L2 weight decay 1e-4 on every parameter, label smoothing 0.1,
bfloat16 computation. It should reach about 76.5-77% top-1 accuracy on the
50,000 ImageNet validation images (`eval/test/accuracy`; `eval/validation` is
the 1% of the training images held out for tuning). Step counts and the
learning rate follow BATCH_SIZE below, not --config.batch_size.
For ghost BatchNorm: `--config.batch_norm.policy=ghost
--config.batch_norm.virtual_batch_size=128`.
"""

import math

import ml_collections

from tuning_playbook import config_schema

BATCH_SIZE = 1024
TRAIN_EXAMPLES = 1_268_355  # imagenet2012 train[:99%].


def epochs_to_steps(epochs: float, batch_size: int = BATCH_SIZE) -> int:
  return math.ceil(epochs * TRAIN_EXAMPLES / batch_size)


TOTAL_STEPS = epochs_to_steps(90)
WARMUP_STEPS = TOTAL_STEPS * 5 // 90  # 5 of the 90 epochs.


def get_config() -> ml_collections.ConfigDict:
  config = config_schema.base_config()
  config.workload = "imagenet_resnet50"
  config.model = ml_collections.ConfigDict(
      {"depth": 50, "width_multiplier": 1.0, "label_smoothing": 0.1})
  config.compute_dtype = "auto"  # bfloat16 on TPUs and GPUs, float32 on CPUs.
  config.batch_size = BATCH_SIZE
  # The decay's 85 epochs; the warmup is prepended to them.
  config.max_train_steps = TOTAL_STEPS - WARMUP_STEPS
  config.eval_every_steps = 2500
  config.log_every_steps = 100
  config.optimizer.name = "nesterov"
  config.optimizer.learning_rate = 0.1 * BATCH_SIZE / 256
  config.optimizer.momentum = 0.9
  # 5 epochs per 85 of decay, and the same share of a --config.max_train_steps.
  config.optimizer.warmup_steps = (
      config.get_ref("max_train_steps") * WARMUP_STEPS
      // (TOTAL_STEPS - WARMUP_STEPS))
  config.optimizer.schedule = "cosine"
  config.optimizer.weight_decay = 1e-4
  config.optimizer.weight_decay_type = "l2"
  config.batch_norm.policy = "global"
  config.batch_norm.momentum = 0.9
  # Decoded images are large: no in-memory cache, and a shuffle buffer of a
  # few GB (TFDS stores the examples already shuffled).
  config.data.cache = False
  config.data.shuffle_buffer = 10_000
  return config
