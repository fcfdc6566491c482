"""Trials per hour of one study: one process per trial vs populations.

  python benchmarks/study_throughput.py [--config=configs/mnist1d_cnn.py] \
      [--num_trials=16] [--max_train_steps=1000] [--parallel=1,2] \
      [--vectorize=4] [--scan=2,8,16]

Runs the same study (the config's default search space, seed 0) through
`python -m tuning_playbook.sweep --run`, each time in a new study directory.
For each --parallel value P: once as one trainer process per trial
(`--isolation=process --parallel=P`, today's runner), once in P study workers
training `--vectorize` trials at once (0: the trials split evenly over the
P workers). With --scan, also once per listed population size K, with the
first P. Each run's wall time counts everything a user waits for, from the
sweep's start to its end; each must leave every trial completed or diverged,
with its summary, metrics, grad norms, config and (when completed) a
checkpoint, or the benchmark fails.

The TFDS data set is prepared once before the timed runs, and each run gets
its own compilation cache (in its study directory), as a new study does.
Prints `ratio_parallel_<P>=<populations trials/hour / per-process
trials/hour>` per P, and last `ratio=`, the one at the first P listed (by
default 1, the sweep's default --parallel: the study as a user runs it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

from tuning_playbook.common import records
from tuning_playbook.studies import tracking

_CONFIG = flags.DEFINE_string("config", "configs/mnist1d_cnn.py", "Config file.")
_NUM_TRIALS = flags.DEFINE_integer("num_trials", 16, "Trials in the study.")
_STEPS = flags.DEFINE_integer("max_train_steps", 1000, "Steps per trial.")
_PARALLEL = flags.DEFINE_list(
    "parallel", ["1", "2"], "Trial processes, and study workers, at once.")
_VECTORIZE = flags.DEFINE_integer(
    "vectorize", 4, "Trials per population (0: num_trials / parallel).")
_SCAN = flags.DEFINE_list(
    "scan", [], "Population sizes to time as well (e.g. 1,2,4,8,16).")


def _check_records(study_dir: str, num_trials: int) -> None:
  """Raises unless every trial ended with complete records."""
  trials = os.path.join(study_dir, "trials")
  for trial_id in sorted(os.listdir(trials))[:num_trials]:
    trial_dir = os.path.join(trials, trial_id)
    status = records.trial_status(trial_dir)["status"]
    if status not in records.FINISHED_STATUSES:
      raise RuntimeError(f"{trial_dir}: {status}")
    for name in (records.METRICS_FILE, records.GRAD_NORMS_FILE,
                 records.CONFIG_FILE, records.SUMMARY_FILE):
      if not os.path.getsize(os.path.join(trial_dir, name)):
        raise RuntimeError(f"{trial_dir}/{name} is empty")
    if status == records.COMPLETED and not os.listdir(
        os.path.join(trial_dir, records.CHECKPOINTS_DIR)):
      raise RuntimeError(f"{trial_dir} has no checkpoint")


def _run_study(root: str, name: str, flags_: list[str]) -> float:
  """Runs the study with these sweep flags; returns its wall seconds."""
  study_dir = os.path.join(root, name)
  argv = [sys.executable, "-m", "tuning_playbook.sweep", f"--config={_CONFIG.value}",
          f"--study_dir={study_dir}", f"--num_trials={_NUM_TRIALS.value}",
          "--seed=0", f"--config.max_train_steps={_STEPS.value}", "--run"] + flags_
  start = time.perf_counter()
  result = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, check=False)
  seconds = time.perf_counter() - start
  if result.returncode:
    raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}:\n"
                       f"{result.stderr[-3000:]}")
  _check_records(study_dir, _NUM_TRIALS.value)
  per_hour = _NUM_TRIALS.value * 3600 / seconds
  print(f"{name}: {_NUM_TRIALS.value} trials in {seconds:.1f} s = "
        f"{per_hour:.0f} trials/hour ({' '.join(flags_)})", flush=True)
  return seconds


def _prepare_data() -> None:
  """Builds the config's data set once, outside the timed runs."""
  code = ("from tuning_playbook import input_pipeline; "
          "from tuning_playbook.training import train; "
          "import importlib.util as u; "
          f"s = u.spec_from_file_location('c', {_CONFIG.value!r}); "
          "m = u.module_from_spec(s); s.loader.exec_module(m); c = m.get_config(); "
          "w = train.validate_before_compiling(c); "
          "input_pipeline.prepare_dataset(w.dataset_builder, c)")
  subprocess.run([sys.executable, "-c", code], check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv):
  del argv
  _prepare_data()
  ratios = {}
  with tempfile.TemporaryDirectory() as root:
    for parallel in map(int, _PARALLEL.value):
      k = _VECTORIZE.value or -(-_NUM_TRIALS.value // parallel)
      baseline = _run_study(root, f"per_process_p{parallel}", [
          "--isolation=process", f"--parallel={parallel}"])
      vectorized = _run_study(root, f"populations_p{parallel}_k{k}", [
          f"--vectorize={k}", f"--parallel={parallel}"])
      ratios[parallel] = baseline / vectorized
      print(f"ratio_parallel_{parallel}={ratios[parallel]:.2f}", flush=True)
      if parallel == int(_PARALLEL.value[0]) and _SCAN.value:
        scan = {k: baseline / _run_study(root, f"scan_p{parallel}_k{k}", [
            f"--vectorize={k}", f"--parallel={parallel}"]) for k in map(int, _SCAN.value)}
        print(f"scan at parallel={parallel} (K: ratio to per-process): "
              + json.dumps(scan, default=lambda x: round(x, 2)), flush=True)
  print(f"ratio={ratios[int(_PARALLEL.value[0])]:.2f}")


if __name__ == "__main__":
  app.run(main)
