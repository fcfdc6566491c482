r"""MNIST-1D, 2-hidden-layer ReLU MLP (Greydanus 2020): about 67% test accuracy.

  python -m tuning_playbook.main --config=configs/mnist1d_mlp.py \
      --workdir=/tmp/mnist1d_mlp

The paper's recipe: Adam (lr 0.01, constant), batch 100, 6000 steps. Reaches
100% training accuracy and 66-68% test accuracy (seeds 0-2): the MLP overfits,
which is the point of comparing it with configs/mnist1d_cnn.py. Well under a
minute on a 2-core CPU.
"""

import ml_collections

from tuning_playbook import config_schema
from tuning_playbook import study_presets


def get_config() -> ml_collections.ConfigDict:
  config = config_schema.base_config()
  config.workload = "mnist1d_mlp"
  config.model = ml_collections.ConfigDict(
      {"width": 100, "depth": 2, "dropout_rate": 0.0})
  config.batch_size = 100
  config.eval_batch_size = 1000
  config.max_train_steps = 6000
  config.eval_every_steps = 500
  config.log_every_steps = 100
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 0.01
  config.optimizer.schedule = "constant"
  config.optimizer.weight_decay = 0.0
  config.data.shuffle_buffer = 4000
  # The data set is tiny: one transfer of 32 batches serves 32 steps.
  config.data.batches_per_transfer = 32
  return config


# The default study of tuning_playbook/study_presets.py (the optimizer's
# nuisance hyperparameters, warmup and weight decay), for the config with
# every --config.* override applied and the --num_trials budget:
#
#   python -m tuning_playbook.sweep --config=configs/mnist1d_mlp.py \
#       --study_dir=runs/mnist1d_mlp_study --num_trials=16 --seed=0 --run --parallel=2
get_search_space = study_presets.default_get_search_space(get_config)
