"""Tiny config for tests: python -m tuning_playbook.main --config=tests/configs/tiny.py --workdir=/tmp/t"""

import ml_collections

from tuning_playbook import config_schema


def get_config():
  config = config_schema.base_config()
  config.workload = "tests.tiny_workload"
  config.batch_size = 16
  config.eval_batch_size = 32
  config.max_train_steps = 35  # And 5 warmup steps before: 40 in all.
  config.eval_every_steps = 10
  config.log_every_steps = 5
  config.num_best_checkpoints = 2
  config.optimizer.name = "momentum"
  config.optimizer.learning_rate = 0.05
  config.optimizer.warmup_steps = 5
  config.data.shuffle_buffer = 1000
  config.model = ml_collections.ConfigDict(
      {"dropout_rate": 0.1, "use_batch_norm": False})
  return config
