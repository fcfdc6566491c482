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
