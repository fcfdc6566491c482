"""A workload whose model code has a defect: tracing it raises."""

import flax.linen as nn

from tests import tiny_workload

INPUT_KEY = tiny_workload.INPUT_KEY
LABEL_KEY = tiny_workload.LABEL_KEY
dataset_builder = tiny_workload.dataset_builder


class BrokenModel(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool):
    raise RuntimeError("defect in BrokenModel.__call__")


def create_model(config):
  del config
  return BrokenModel()
