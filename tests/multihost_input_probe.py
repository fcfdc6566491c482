"""Run in each process of a multi-process job: one epoch of this host's stream.

Prints `INDICES <json>`: the example indices this host's training stream
yields over one epoch, and its eval-split batch count.
"""

import json
import sys

from absl import app
from absl import flags
import jax
import numpy as np
import tensorflow as tf

from tests import helpers
from tests import tiny_workload
from tuning_playbook import input_pipeline
from tuning_playbook.training import distributed

flags.DEFINE_string("coordinator_address", "", "")
flags.DEFINE_integer("num_processes", 1, "")
flags.DEFINE_integer("process_id", 0, "")
flags.DEFINE_integer("distributed_timeout_seconds", 60, "")
flags.DEFINE_string("data_dir", "", "")
FLAGS = flags.FLAGS


def _preprocess(example, *, train, seed):
  del train, seed
  return {"inputs": example["x"], "label": tf.cast(example["y"], tf.int32),
          "index": example["index"]}


def main(argv):
  del argv
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                         FLAGS.process_id, FLAGS.distributed_timeout_seconds)
  config = helpers.load_config(**{"data.data_dir": FLAGS.data_dir})
  builder = input_pipeline.prepare_dataset(tiny_workload.dataset_builder, config)
  stream = input_pipeline.TrainStream(
      builder, "train", _preprocess, seed=0, local_batch_size=1,
      process_index=jax.process_index(), process_count=jax.process_count(),
      shuffle_buffer=1000)
  iterator = stream.iterate(0)
  indices = [int(next(iterator)["index"][0]) for _ in range(stream.examples_per_epoch)]
  evals = input_pipeline.make_eval_split(
      builder, "validation", "validation", _preprocess, local_batch_size=8,
      process_index=jax.process_index(), process_count=jax.process_count())
  seen = [int(i) for b in evals.batches() for i in b["index"][b["weight"] > 0]]
  print("INDICES " + json.dumps({"train": indices, "eval_batches": evals.num_batches,
                                 "eval_seen": seen}), flush=True)
  sys.exit(0)


if __name__ == "__main__":
  app.run(main)
