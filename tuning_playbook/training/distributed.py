"""Joins a multi-process JAX job: explicit flags, or JAX's own cluster detection.

On CPU the gloo collectives are selected, so several processes on one machine
form one job (used by the multi-process tests).
"""

from __future__ import annotations

import os
import socket
import time
from typing import Mapping

from absl import logging
import jax


class CoordinatorUnreachableError(RuntimeError):
  """Process 0 (the coordinator) did not answer in time."""


class ClusterJoinError(RuntimeError):
  """The environment shows a multi-process cluster, but joining it failed."""


_JAX_COORDINATION_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_IP",
                               "JAX_COORDINATOR_PORT", "JAX_NUM_PROCESSES",
                               "JAX_PROCESS_ID")


def _count(environ: Mapping[str, str], name: str) -> int:
  value = environ.get(name, "").strip()
  return int(value) if value.isdigit() else 0


def cluster_evidence(environ: Mapping[str, str] = os.environ) -> list[str]:
  """What in the environment says this process is one of several.

  The JAX coordination variables, a SLURM step or Open MPI job with more than
  one task, a multi-host TPU slice (its worker list, or JAX's TPU detection).
  """
  evidence = [f"{name}={environ[name]}" for name in _JAX_COORDINATION_VARIABLES
              if environ.get(name)]
  slurm_tasks = max(_count(environ, "SLURM_STEP_NUM_TASKS"),
                    _count(environ, "SLURM_NTASKS"))
  if environ.get("SLURM_JOB_ID") and slurm_tasks > 1:
    evidence.append(f"SLURM job {environ['SLURM_JOB_ID']} with {slurm_tasks} tasks")
  if _count(environ, "OMPI_COMM_WORLD_SIZE") > 1:
    evidence.append(f"Open MPI job of {environ['OMPI_COMM_WORLD_SIZE']} ranks")
  hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if len(hosts) > 1:
    evidence.append(f"TPU slice of {len(hosts)} hosts (TPU_WORKER_HOSTNAMES)")
  if environ is os.environ:
    evidence += _jax_detected_tpu_clusters()
  return evidence


def _jax_detected_tpu_clusters() -> list[str]:
  try:
    from jax._src import clusters  # pylint: disable=g-import-not-at-top
    found = []
    for cluster in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
      if "Tpu" in cluster.__name__ and not cluster.opt_in_only_method:
        if cluster.is_env_present():
          found.append(f"Cloud TPU VM ({cluster.__name__})")
    return found
  except Exception:  # pylint: disable=broad-except
    return []  # Detection is best effort; the variables above still apply.


def wait_for_coordinator(address: str, timeout_seconds: float) -> None:
  """Waits until the coordinator accepts connections, or raises naming it."""
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout_seconds
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
        return
    except OSError as e:
      if time.monotonic() > deadline:
        raise CoordinatorUnreachableError(
            f"process 0 (the coordinator at {address}) did not accept a "
            f"connection within {timeout_seconds}s: {e}") from None
      time.sleep(0.5)


def initialize(coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1, timeout_seconds: int = 300) -> None:
  """Calls `jax.distributed.initialize` when a multi-process job is asked for.

  With a coordinator address, all three values are required and a failure to
  connect raises (a job never silently runs alone). Without one, JAX's cluster
  detection applies (Cloud TPU, SLURM, ...); if it fails, one process runs,
  unless the environment shows a cluster (`cluster_evidence`): then it raises
  ClusterJoinError, since N lone processes would share one work directory.
  """
  explicit = bool(coordinator_address)
  if explicit and (num_processes < 1 or process_id < 0):
    raise ValueError(
        "--coordinator_address needs --num_processes >= 1 and --process_id >= 0 "
        f"(got num_processes={num_processes}, process_id={process_id})")
  if explicit and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in [0, {num_processes})")
  if explicit and num_processes == 1:
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    logging.info("Process %d of %d: joining the job at %s (waiting up to %ds for "
                 "every process; a missing one aborts the job).", process_id,
                 num_processes, coordinator_address, timeout_seconds)
    if process_id > 0:
      wait_for_coordinator(coordinator_address, timeout_seconds)
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id, initialization_timeout=timeout_seconds)
  else:
    try:
      jax.distributed.initialize(initialization_timeout=timeout_seconds)
    except Exception as e:  # pylint: disable=broad-except
      evidence = cluster_evidence()
      if evidence:
        raise ClusterJoinError(
            f"the environment shows a multi-process job ({'; '.join(evidence)}), "
            f"but joining it failed: {type(e).__name__}: {e}. Refusing to run as "
            "a lone process; pass --coordinator_address/--num_processes/"
            "--process_id explicitly, or fix the cluster set-up.") from e
      logging.info("No multi-process cluster detected (%s); running one process.", e)
      return
  logging.info("Process %d of %d; %d local of %d devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


class BarrierError(RuntimeError):
  """Processes did not all arrive at a barrier in time, or disagree."""


def agree(name: str, value: str, timeout_seconds: float) -> None:
  """A barrier at which every process must bring the same `value`.

  Raises BarrierError naming the processes that did not arrive within the
  timeout, or those whose value differs from process 0's. Each `name` must be
  used once per job.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  prefix = f"tuning_playbook/{name}/"
  client.key_value_set(f"{prefix}{jax.process_index()}", value)
  try:
    client.wait_at_barrier(name, timeout_in_ms=int(timeout_seconds * 1000))
    timed_out = False
  except Exception:  # pylint: disable=broad-except
    timed_out = True
  values = {int(k.rsplit("/", 1)[1]): v for k, v in client.key_value_dir_get(prefix)}
  if timed_out:
    missing = sorted(set(range(jax.process_count())) - set(values))
    raise BarrierError(
        f"barrier {name!r}: process(es) {missing} did not arrive within "
        f"{timeout_seconds}s")
  differing = {i: v for i, v in values.items() if v != values[0]}
  if differing:
    raise BarrierError(f"barrier {name!r}: process 0 has {values[0]!r}, but "
                       + ", ".join(f"process {i} has {v!r}" for i, v in
                                   sorted(differing.items())))
