"""Joins a multi-process JAX job: explicit flags, or JAX's own cluster detection.

On CPU the gloo collectives are selected, so several processes on one machine
form one job (used by the multi-process tests).
"""

from __future__ import annotations

import socket
import time

from absl import logging
import jax


class CoordinatorUnreachableError(RuntimeError):
  """Process 0 (the coordinator) did not answer in time."""


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
  detection applies (Cloud TPU, SLURM, ...); if none is found, one process runs.
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
    except (ValueError, RuntimeError) as e:
      logging.info("No multi-process cluster detected (%s); running one process.", e)
      return
  logging.info("Process %d of %d; %d local of %d devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
