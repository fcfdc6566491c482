"""Writes a profiler trace of a few steady-state training steps.

  python xprof/trace_steps.py --config=configs/mnist1d_cnn.py --trace_dir=/tmp/trace \
      [--warmup_steps=20] [--traced_steps=20]

Builds the trial exactly as `tuning_playbook.main` does (in a temporary work
directory), trains past compilation, then traces `traced_steps` steps with
`jax.profiler.trace`. Open the trace with TensorBoard's profiler plugin
(`tensorboard --logdir=/tmp/trace`) or in Perfetto; `xprof/summarize_trace.py
--trace_dir=/tmp/trace` prints its time per op category. To trace steps of a
real run instead, set `--config.profile_steps=START:END`.
"""

import tempfile

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from tuning_playbook.common import cpu_devices
from tuning_playbook.training import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config.",
                                          lock_config=True)
_TRACE_DIR = flags.DEFINE_string("trace_dir", None, "Where the trace is written.")
_WARMUP = flags.DEFINE_integer("warmup_steps", 20, "Steps before tracing.")
_TRACED = flags.DEFINE_integer("traced_steps", 20, "Steps traced.")
flags.mark_flags_as_required(["config", "trace_dir"])


def main(argv):
  del argv
  cpu_devices.configure_thread_pool()
  config = _CONFIG.value
  total = _WARMUP.value + _TRACED.value
  with config.unlocked():
    config.max_train_steps = max(total, config.optimizer.warmup_steps)
    config.eval_every_steps = config.max_train_steps
  workload = train.validate_before_compiling(config)
  with tempfile.TemporaryDirectory() as workdir:
    trainer = train.Trainer([config], [workdir], [workload])
    trainer.train(_WARMUP.value)
    jax.block_until_ready(trainer.state)
    with jax.profiler.trace(_TRACE_DIR.value):
      trainer.train(total)
      jax.block_until_ready(trainer.state)
    trainer.finish()
    print(f"trace of steps {_WARMUP.value + 1}..{total} written to {_TRACE_DIR.value}")


if __name__ == "__main__":
  app.run(main)
