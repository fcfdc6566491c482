"""A fast stand-in for `python -m tuning_playbook.main` in sweep tests.

It honours the run-directory contract (summary.json with completed / diverged /
failed, resume from the latest checkpoint, a finished run is left as it is)
and reads its behaviour from the environment:

  FAKE_TRAINER_STEP_SECONDS   sleep per training step (default 0).
  FAKE_TRAINER_DIVERGE_ABOVE  learning rates above this diverge at step 2.
  FAKE_TRAINER_FAIL_ABOVE     learning rates above this fail to start (exit 1,
                              no summary).
  FAKE_TRAINER_OOM_ABOVE_BATCH  batch sizes above this fail as out of memory.
  FAKE_TRAINER_SEED_NOISE     the error rate varies by up to this much with
                              the seed (default 0).
  FAKE_TRAINER_EVAL_ROWS      1: every eval_every_steps (and the last step)
                              a metrics row holds eval/validation/error_rate,
                              the error rate + 64 / (step x min(batch_size,
                              FAKE_TRAINER_CRITICAL_BATCH)), so the steps to a
                              value halve as the batch doubles up to that
                              critical batch; and eval/test/error_rate (+0.01).
                              The summary's best value is the last one.
  FAKE_TRAINER_HOLD_AT_STEP   once this step is checkpointed, wait to be
                              killed (exit 1 after HOLD_SECONDS), so a test
                              stops trials at a known step.

summary.json has a `perf` block like the trainer's, with a step taking
(batch_size + 64) ms, so that throughput saturates as the batch grows.

Each launch appends {"start_step": s} to starts.jsonl, so a test can tell a
resumed run from one that started over.
"""

import json
import math
import os
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from tuning_playbook.common import atomic_files
from tuning_playbook.common import records
from tuning_playbook import config_schema

# A held trial that nobody kills exits after this long, failing its test.
HOLD_SECONDS = 120.0

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")


def _error_rate(config):
  lr = config.optimizer.learning_rate
  # Seed noise: a fixed value in [-1, 1) per seed, times the variable.
  noise = float(os.environ.get("FAKE_TRAINER_SEED_NOISE", "0")) * (
      (config.seed * 2654435761) % 1000 / 500 - 1)
  return min(1.0, 0.05 + 0.1 * (math.log10(lr) + 1.5) ** 2
             + 0.1 * (1 - config.optimizer.momentum) + noise)


def _eval_value(config, step):
  """The validation error after `step` steps: it falls with the examples seen."""
  batch = min(config.batch_size,
              float(os.environ.get("FAKE_TRAINER_CRITICAL_BATCH", "inf")))
  return _error_rate(config) + 64.0 / (step * batch)


def _hold():
  """Waits to be killed; a trial nobody kills fails instead of finishing."""
  deadline = time.monotonic() + HOLD_SECONDS
  while time.monotonic() < deadline:
    time.sleep(0.05)
  raise SystemExit(f"held for {HOLD_SECONDS}s and never killed")


def main(argv):
  del argv
  config, workdir = _CONFIG.value, _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  summary_path = os.path.join(workdir, records.SUMMARY_FILE)
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      if json.load(f)["status"] in records.FINISHED_STATUSES:
        return
  atomic_files.write_json(os.path.join(workdir, records.CONFIG_FILE),
                          config.to_dict())
  ckpt_path = os.path.join(workdir, "checkpoint.json")
  start = 0
  if os.path.exists(ckpt_path):
    with open(ckpt_path) as f:
      start = json.load(f)["step"]
  with open(os.path.join(workdir, "starts.jsonl"), "a") as f:
    f.write(json.dumps({"start_step": start, "pid": os.getpid()}) + "\n")
  lr = config.optimizer.learning_rate
  if config.batch_size > float(os.environ.get("FAKE_TRAINER_OOM_ABOVE_BATCH",
                                              "inf")):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                       f"allocate a batch of {config.batch_size}")
  if lr > float(os.environ.get("FAKE_TRAINER_FAIL_ABOVE", "inf")):
    raise RuntimeError(f"fake failure to start at learning rate {lr}")
  diverge = lr > float(os.environ.get("FAKE_TRAINER_DIVERGE_ABOVE", "inf"))
  sleep = float(os.environ.get("FAKE_TRAINER_STEP_SECONDS", "0"))
  hold_at = int(os.environ.get("FAKE_TRAINER_HOLD_AT_STEP", "0"))
  evals = os.environ.get("FAKE_TRAINER_EVAL_ROWS") == "1"
  total = config_schema.total_train_steps(config)
  summary = {"best_metric": config.best_metric, "best_mode": config.best_mode,
             "max_train_steps": config.max_train_steps,
             "total_train_steps": total}
  seconds_per_step = (config.batch_size + 64) / 1000.0
  summary["perf"] = {"steps_timed": total,
                     "seconds_timed": total * seconds_per_step,
                     "examples_per_second": config.batch_size / seconds_per_step}
  for step in range(start + 1, total + 1):
    time.sleep(sleep)
    if diverge and step >= 2:
      atomic_files.write_json(summary_path, dict(
          summary, status=records.DIVERGED, best_step=None, best_value=None,
          final_step=step, best_checkpoint=None,
          reason=f"train/loss is NaN at step {step}"))
      return
    with open(os.path.join(workdir, records.METRICS_FILE), "a") as f:
      f.write(json.dumps({"step": step, "train/loss": 1.0 / step}) + "\n")
      if evals and (step % config.eval_every_steps == 0 or step == total):
        value = _eval_value(config, step)
        f.write(json.dumps({"step": step, "eval/validation/error_rate": value,
                            "eval/test/error_rate": value + 0.01}) + "\n")
    atomic_files.write_json(ckpt_path, {"step": step})
    if step == hold_at:
      _hold()
  best_value = _eval_value(config, total) if evals else _error_rate(config)
  atomic_files.write_json(summary_path, dict(
      summary, status=records.COMPLETED, best_step=total,
      best_value=best_value, final_step=total,
      best_checkpoint=os.path.join(workdir, "checkpoint.json"), reason=None))


if __name__ == "__main__":
  app.run(main)
