"""Steady-state throughput of the framework's loop vs a bare jitted loop.

  python benchmarks/step_overhead.py [--config=configs/mnist1d_cnn.py] \
      [--steps_per_round=200] [--rounds=5]

Both loops run the same model, global batch and optimizer in this process,
alternating round by round after a warm-up. The framework loop is
`train.Trainer.train`: input pipeline, prefetch to devices, the compiled step
with donation, metrics fetched every `log_every_steps`, records written. The
bare loop calls a jitted step of the same train step function on one batch
already on the devices, and blocks once at the end of the round. The last
line printed is `ratio=<framework steps/s / bare steps/s>`: the median over
rounds of each round's ratio (a round times both loops back to back, so slow
phases of a shared machine hit both).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from tuning_playbook import cpu_devices
from tuning_playbook import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/mnist1d_cnn.py", "Training config.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps_per_round", 300, "Steps per timed round.")
_ROUNDS = flags.DEFINE_integer("rounds", 15, "Timed rounds of each loop.")


def main(argv):
  del argv
  cpu_devices.configure_thread_pool()
  config = _CONFIG.value
  steps, rounds = _STEPS.value, _ROUNDS.value
  total = steps * (2 * rounds + 1) + 1
  with config.unlocked():
    config.max_train_steps = total
    config.eval_every_steps = total  # No eval inside the timed rounds.
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, total)
  workload = train.validate_before_compiling(config)
  with tempfile.TemporaryDirectory() as workdir:
    trainer = train.Trainer(config, workdir, workload)
    bare_step = jax.jit(trainer.step_fn, donate_argnums=0)
    batch = jax.tree.map(lambda x: x[0], next(trainer.batches))
    bare_state = jax.tree.map(lambda x: x.copy(), trainer.state)

    def run_framework():
      start = time.perf_counter()
      trainer.train(trainer.step + steps)
      jax.block_until_ready(trainer.state)
      return steps / (time.perf_counter() - start)

    def run_bare():
      nonlocal bare_state
      start = time.perf_counter()
      for _ in range(steps):
        bare_state, _ = bare_step(bare_state, batch)
      jax.block_until_ready(bare_state)
      return steps / (time.perf_counter() - start)

    run_framework()  # Warm-up: compilation, pipeline start, caches.
    run_bare()
    framework, bare = [], []
    for i in range(rounds):
      # Alternate which loop goes first, so neither always follows the other.
      if i % 2:
        bare.append(run_bare())
        framework.append(run_framework())
      else:
        framework.append(run_framework())
        bare.append(run_bare())
    trainer.finish(None)
  ratio = statistics.median(f / b for f, b in zip(framework, bare))
  print(f"backend={jax.default_backend()} devices={jax.device_count()} "
        f"workload={config.workload} batch_size={config.batch_size} "
        f"steps_per_round={steps} rounds={rounds}")
  print("framework steps/s per round: " + " ".join(f"{x:.1f}" for x in framework))
  print("bare steps/s per round:      " + " ".join(f"{x:.1f}" for x in bare))
  print(f"median steps/s: framework {statistics.median(framework):.1f}, "
        f"bare {statistics.median(bare):.1f}")
  print(f"ratio={ratio:.3f}")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
