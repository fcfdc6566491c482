r"""CIFAR-10, WideResNet-16-4 with BatchNorm: about 95% test accuracy.

  python -m tuning_playbook.main --config=configs/cifar10_wrn.py \
      --workdir=/tmp/cifar10_wrn

Needs an accelerator (and TFDS downloads CIFAR-10 once, on first use).
Nesterov momentum 0.9, lr 0.1 with cosine decay, L2 5e-4, batch 128, 200
epochs of the 45000 training images (70k steps), crop-and-flip augmentation.
Zagoruyko & Komodakis (2016) report about 5% test error for WRN-16-4 (2.7M
parameters) with the step-decay version of this recipe. For ghost BatchNorm, e.g.
`--config.batch_norm.policy=ghost --config.batch_norm.virtual_batch_size=32`.
`--config.compute_dtype=bfloat16` computes in bfloat16 (parameters stay
float32); `--config.data.synthetic=True` measures steps/s on random batches
without downloading CIFAR-10.
"""

import ml_collections

from tuning_playbook import config_schema


def get_config() -> ml_collections.ConfigDict:
  config = config_schema.base_config()
  config.workload = "cifar10_wrn"
  config.model = ml_collections.ConfigDict(
      {"depth": 16, "width": 4, "dropout_rate": 0.0})
  config.batch_size = 128
  config.eval_batch_size = 1000
  config.max_train_steps = 70_000
  config.eval_every_steps = 1000
  config.log_every_steps = 100
  config.optimizer.name = "nesterov"
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.schedule = "cosine"
  config.optimizer.weight_decay = 5e-4
  config.optimizer.weight_decay_type = "l2"
  config.batch_norm.policy = "global"
  config.batch_norm.momentum = 0.9
  config.data.shuffle_buffer = 45_000
  return config
