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

Before that, a whole run of the config at its own cadence (`max_train_steps`,
`eval_every_steps`, the last eval and checkpoint; `--cadence_steps` shortens
it) reports the share of its wall time spent inside evals and inside
checkpoint calls (starting a save, and the final wait for the last ones):
`eval_fraction=...` and `checkpoint_fraction=...`. Compilation counts in the
wall time, not in either share.
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

from tuning_playbook.common import cpu_devices
from tuning_playbook import config_schema
from tuning_playbook.training import sharding
from tuning_playbook.training import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/mnist1d_cnn.py", "Training config.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps_per_round", 300, "Steps per timed round.")
_ROUNDS = flags.DEFINE_integer("rounds", 15, "Timed rounds of each loop.")
_CADENCE_STEPS = flags.DEFINE_integer(
    "cadence_steps", None,
    "Steps of the run at the config's eval cadence (default: the config's "
    "whole run; 0 skips it).")


def _timed(fn, totals: dict[str, float], key: str):
  """`fn`, adding the seconds each call takes to totals[key]."""
  def wrapper(*args, **kwargs):
    start = time.perf_counter()
    try:
      return fn(*args, **kwargs)
    finally:
      totals[key] += time.perf_counter() - start
  return wrapper


def cadence_fractions(config, workload, steps: int) -> dict[str, float]:
  """Wall seconds of a run of `steps` at the config's eval cadence, and the
  shares of it inside evals and inside checkpoint calls."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    if steps != config_schema.total_train_steps(config):
      # A shortened run keeps the warmup's share of the steps.
      share = config.optimizer.warmup_steps / config_schema.total_train_steps(config)
      config.optimizer.warmup_steps = int(steps * share)
      config.max_train_steps = steps - (
          config.optimizer.warmup_steps
          if config.optimizer.warmup_mode == "prepended" else 0)
  totals = {"eval": 0.0, "checkpoint": 0.0}
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    trainer = train.Trainer([config], [workdir], [workload])
    evaluator, records = trainer.programs.trial_evaluator, trainer.records[0]
    evaluator.evaluate = _timed(evaluator.evaluate, totals, "eval")
    records.ckpt.save = _timed(records.ckpt.save, totals, "checkpoint")
    records.ckpt.wait = _timed(records.ckpt.wait, totals, "checkpoint")
    trainer.run()
    wall = time.perf_counter() - start
  return {"wall_seconds": wall, "steps": trainer.total_steps,
          "eval_every_steps": config.eval_every_steps,
          "eval_fraction": totals["eval"] / wall,
          "checkpoint_fraction": totals["checkpoint"] / wall}


def main(argv):
  del argv
  cpu_devices.configure_thread_pool()
  config = _CONFIG.value
  steps, rounds = _STEPS.value, _ROUNDS.value
  cadence_steps = (_CADENCE_STEPS.value if _CADENCE_STEPS.value is not None
                   else config_schema.total_train_steps(config))
  cadence = (cadence_fractions(config, train.validate_before_compiling(config),
                               cadence_steps) if cadence_steps else None)
  total = steps * (2 * rounds + 1) + 1
  with config.unlocked():
    config.max_train_steps = total
    config.eval_every_steps = total  # No eval inside the timed rounds.
    config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, total)
  workload = train.validate_before_compiling(config)
  with tempfile.TemporaryDirectory() as workdir:
    trainer = train.Trainer([config], [workdir], [workload])
    bare_step = jax.jit(trainer.programs.step_fn, donate_argnums=0)
    # The first global batch itself (the loop's transfers may hold indices).
    batch = sharding.to_global(next(trainer.records[0].stream.iterate(0)),
                               sharding.batch_sharding(sharding.create_mesh()))
    bare_state = trainer.programs.take_trial(trainer.state, 0)

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
    trainer.finish()
  ratio = statistics.median(f / b for f, b in zip(framework, bare))
  print(f"backend={jax.default_backend()} devices={jax.device_count()} "
        f"workload={config.workload} batch_size={config.batch_size} "
        f"steps_per_round={steps} rounds={rounds}")
  print("framework steps/s per round: " + " ".join(f"{x:.1f}" for x in framework))
  print("bare steps/s per round:      " + " ".join(f"{x:.1f}" for x in bare))
  print(f"median steps/s: framework {statistics.median(framework):.1f}, "
        f"bare {statistics.median(bare):.1f}")
  if cadence is not None:
    print(f"cadence run: {cadence['steps']} steps, eval every "
          f"{cadence['eval_every_steps']}, {cadence['wall_seconds']:.1f} s")
    print(f"eval_fraction={cadence['eval_fraction']:.4f}")
    print(f"checkpoint_fraction={cadence['checkpoint_fraction']:.4f}")
  print(f"ratio={ratio:.3f}")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
