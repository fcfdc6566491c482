"""Joining a cluster: a failed join where the environment shows one is loud."""

import os
import subprocess

import pytest

from tests import helpers
from tuning_playbook.training import distributed


@pytest.mark.parametrize("environ,expected", [
    ({}, []),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, []),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, ["SLURM job 7 with 4 tasks"]),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "2"},
     ["SLURM job 7 with 2 tasks"]),
    ({"OMPI_COMM_WORLD_SIZE": "8"}, ["Open MPI job of 8 ranks"]),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, []),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, ["TPU slice of 4 hosts (TPU_WORKER_HOSTNAMES)"]),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2"},
     ["JAX_COORDINATOR_ADDRESS=10.0.0.1:1234", "JAX_NUM_PROCESSES=2"]),
])
def test_cluster_evidence(environ, expected):
  assert distributed.cluster_evidence(environ) == expected


@pytest.mark.parametrize("variables,named", [
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:9"}, "JAX_COORDINATOR_ADDRESS=127.0.0.1:9"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, "SLURM job 7 with 2 tasks"),
])
def test_a_failed_join_of_a_visible_cluster_exits_non_zero(tmp_path, variables, named):
  workdir = tmp_path / "run"
  env = dict(helpers.subprocess_env(), **variables)
  result = subprocess.run(
      helpers.main_command(str(workdir), f"--config.data.data_dir={tmp_path / 'data'}",
                           "--distributed_timeout_seconds=2"),
      cwd=helpers.REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1, result.stderr[-3000:]
  assert f"the environment shows a multi-process job ({named})" in result.stderr
  assert "Refusing to run as a lone process" in result.stderr
  assert not os.path.exists(workdir)


@pytest.mark.slow
def test_no_cluster_runs_one_process(tmp_path):
  result = helpers.run_main(str(tmp_path / "run"),
                            "--config.max_train_steps=10", "--config.eval_every_steps=10",
                            "--config.optimizer.warmup_steps=2")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "running one process" in result.stderr
