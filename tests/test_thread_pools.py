"""Processes the framework starts size their own XLA:CPU thread pool.

The harness sizes the pool of the test process only (conftest.py) and no
subprocess inherits that: a sweep's study workers and trainer processes on 4
simulated devices finish only because they set `PJRT_NPROC` themselves
(cpu_devices.py; without it their collectives stall on a 2-core machine).
"""

import glob
import os
import subprocess
import sys

import jax
import pytest

from tests import conftest
from tests import helpers
from tests import test_sweep


def test_the_harness_leaves_no_thread_pool_setting_to_subprocesses():
  assert jax.device_count() == conftest.NUM_TEST_DEVICES
  for name in conftest.HARNESS_ONLY_VARIABLES:
    assert name not in os.environ, name


@pytest.mark.slow
@pytest.mark.parametrize("isolation", ["worker", "process"])
def test_sweep_processes_size_their_own_thread_pool(tmp_path, isolation):
  study = tmp_path / "study"
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(4),
             PYTHONPATH=os.pathsep.join([helpers.REPO, test_sweep.HERE]))
  for name in conftest.HARNESS_ONLY_VARIABLES:
    assert name not in env, name
  result = subprocess.run(
      [sys.executable, "-m", "tuning_playbook.sweep", f"--config={test_sweep.TINY}",
       f"--study_dir={study}", "--seed=0", "--num_trials=1", "--run",
       f"--isolation={isolation}", "--config.max_train_steps=10",
       "--config.eval_every_steps=5", "--config.log_every_steps=5"],
      cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = test_sweep._read_csv(study / "results.csv")
  assert [r["status"] for r in rows] == ["completed"]
  logs = (glob.glob(str(study / "workers" / "*.log")) if isolation == "worker"
          else glob.glob(str(study / "trials" / "*" / "log.txt")))
  assert logs
  for path in logs:
    with open(path) as f:
      assert "4 simulated CPU devices: PJRT_NPROC=10 threads" in f.read(), path
