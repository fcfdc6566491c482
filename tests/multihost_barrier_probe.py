"""Run in each process of a 2-process job: `distributed.agree` failures.

  --case=late: process 1 arrives after the timeout; process 0 must name it.
  --case=differ: process 1 brings another value; both must name it.
Prints the BarrierError message.
"""

import time

from absl import app
from absl import flags
import jax

from tuning_playbook.training import distributed

flags.DEFINE_string("coordinator_address", "", "")
flags.DEFINE_integer("num_processes", 1, "")
flags.DEFINE_integer("process_id", 0, "")
flags.DEFINE_integer("distributed_timeout_seconds", 60, "")
flags.DEFINE_enum("case", "late", ["late", "differ"], "")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                         FLAGS.process_id, FLAGS.distributed_timeout_seconds)
  if FLAGS.case == "late" and jax.process_index() == 1:
    time.sleep(6)
  value = "20" if FLAGS.case == "late" or jax.process_index() == 0 else "30"
  try:
    distributed.agree(f"probe_{FLAGS.case}", value, timeout_seconds=2)
    print("AGREED", flush=True)
  except distributed.BarrierError as e:
    print(f"BarrierError: {e}", flush=True)
  time.sleep(1)


if __name__ == "__main__":
  app.run(main)
