"""A tiny study for the sweep tests: 20 steps of mnist1d_mlp.

  python -m tuning_playbook.sweep --config=tests/configs/tiny_study.py \
      --study_dir=/tmp/tiny/study --num_trials=2 --seed=0 --run
"""

import ml_collections

from tuning_playbook import config_schema


def get_config():
  config = config_schema.base_config()
  config.workload = "mnist1d_mlp"
  config.batch_size = 32
  config.max_train_steps = 20
  config.eval_every_steps = 10
  config.log_every_steps = 5
  config.num_best_checkpoints = 1
  config.data.shuffle_buffer = 1000
  config.model = ml_collections.ConfigDict(
      {"width": 32, "depth": 1, "dropout_rate": 0.0})
  return config


def get_search_space():
  return {
      "name": "tiny",
      "description": "Learning rate, momentum and warmup of a tiny MLP.",
      "nuisance": {
          "optimizer.learning_rate": {"scale": "log", "min": 1e-3, "max": 1.0},
          "optimizer.momentum": {"scale": "reverse_log", "min": 0.5,
                                 "max": 0.99},
          "optimizer.warmup_steps": {"scale": "int_linear", "min": 0,
                                     "max": 4},
      },
      "fixed": {"optimizer.schedule": "cosine"},
  }
