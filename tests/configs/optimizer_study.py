"""Nesterov versus Adam, one study per optimizer, for the sweep tests."""

from tuning_playbook import config_schema


def get_config():
  config = config_schema.base_config()
  config.workload = "mnist1d_mlp"
  config.max_train_steps = 20
  return config


def get_search_space():
  return {
      "name": "optimizers",
      "description": "Which optimizer reaches the lower error?",
      "scientific": {"optimizer.name": {
          "values": ["nesterov", "adam"],
          "conditional": {
              "nesterov": {
                  "optimizer.learning_rate": {"scale": "log", "min": 1e-2,
                                              "max": 1.0},
                  "optimizer.momentum": {"scale": "reverse_log", "min": 0.5,
                                         "max": 0.99}},
              "adam": {
                  "optimizer.learning_rate": {"scale": "log", "min": 1e-4,
                                              "max": 1e-2},
                  "optimizer.beta1": {"scale": "reverse_log", "min": 0.5,
                                      "max": 0.99}}}}},
      "nuisance": {"optimizer.weight_decay": {"scale": "log", "min": 1e-5,
                                              "max": 1e-2}},
  }
