"""Run in each process of a multi-process job: BatchNorm on a global batch.

Every process builds the same global batch, contributes its own rows, applies
BatchNorm under jax.jit in training mode, and compares the gathered output and
moving averages with a numpy reference on the full batch. Prints "OK <cases>".
"""

import sys

from absl import app
from absl import flags
import jax
from jax.experimental import multihost_utils
import numpy as np

from tuning_playbook import batch_norm
from tuning_playbook.training import distributed
from tuning_playbook.training import sharding

flags.DEFINE_string("coordinator_address", "", "")
flags.DEFINE_integer("num_processes", 1, "")
flags.DEFINE_integer("process_id", 0, "")
flags.DEFINE_integer("distributed_timeout_seconds", 60, "")
FLAGS = flags.FLAGS
BATCH, FEATURES, MOMENTUM, EPS = 16, 3, 0.9, 1e-5


def reference(x, group):
  groups = x.reshape(BATCH // group, group, FEATURES)
  mean = groups.mean(axis=1, keepdims=True)
  var = ((groups - mean) ** 2).mean(axis=1, keepdims=True)
  y = ((groups - mean) / np.sqrt(var + EPS)).reshape(x.shape)
  ema_mean = (1 - MOMENTUM) * mean.reshape(-1, FEATURES).mean(0)
  ema_var = MOMENTUM * 1.0 + (1 - MOMENTUM) * var.reshape(-1, FEATURES).mean(0)
  return y, ema_mean, ema_var


def main(argv):
  del argv
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                         FLAGS.process_id, FLAGS.distributed_timeout_seconds)
  mesh = sharding.create_mesh()
  per_device = BATCH // jax.device_count()
  x = np.random.default_rng(0).normal(2.0, 3.0, (BATCH, FEATURES)).astype(np.float32)
  local_rows = BATCH // jax.process_count()
  local = x[jax.process_index() * local_rows:(jax.process_index() + 1) * local_rows]
  global_x = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), local)
  cases = [("global", 0, BATCH), ("ghost", 2, 2), ("ghost", 8, 8),
           ("per_device", 0, per_device)]
  for policy, vbs, group in cases:
    layer = batch_norm.BatchNorm(policy=policy, virtual_batch_size=vbs,
                                 num_devices=jax.device_count(), momentum=MOMENTUM,
                                 epsilon=EPS)
    variables = layer.init(jax.random.key(0), x[:group], train=False)
    apply = jax.jit(lambda v, b: layer.apply(v, b, train=True, mutable=["batch_stats"]),
                    out_shardings=(sharding.batch_sharding(mesh),
                                   sharding.replicated(mesh)))
    y, updates = apply(variables, global_x)
    sharding.check_replicas_identical(updates, f"{policy} batch_stats")
    y_all = np.asarray(multihost_utils.process_allgather(y, tiled=True))
    ref_y, ref_mean, ref_var = reference(x, group)
    np.testing.assert_allclose(y_all, ref_y, rtol=1e-4, atol=1e-4)
    stats = jax.device_get(updates["batch_stats"])
    np.testing.assert_allclose(stats["mean"], ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], ref_var, rtol=1e-5, atol=1e-6)
  print("OK " + " ".join(f"{p}:{g}" for p, _, g in cases), flush=True)
  sys.exit(0)


if __name__ == "__main__":
  app.run(main)
