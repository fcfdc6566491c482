"""Simulated CPU devices: thread pools large enough for their collectives.

XLA:CPU sizes its two thread pools (the one that launches and runs each
device's program, and the intra-op pool its continuations run on) to
max(cores, devices): just enough to launch one collective. With asynchronous
dispatch, a device's next launch also holds a pool thread while it waits for
that device's in-flight slot, and a device that reaches an all-reduce holds
its thread until every device has arrived. On a 2-core machine with 2 or more
simulated devices the last device's program then finds no free thread, and
the rendezvous aborts after 40 s ("Expected 4 threads to join the rendezvous,
but only 3 of them arrived"); across processes (gloo) it waits forever.
`configure_thread_pool()` raises the pool size through `PJRT_NPROC` before the
CPU backend starts; real accelerators are not affected.
"""

from __future__ import annotations

import os
import re
from typing import MutableMapping

from absl import logging

POOL_SIZE_VARIABLES = ("PJRT_NPROC", "NPROC")  # Read by XLA:CPU, in this order.
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def simulated_device_count(environ: MutableMapping[str, str] = os.environ) -> int:
  """CPU devices per process asked for by XLA_FLAGS or `jax_num_cpu_devices`."""
  count = 1
  match = _DEVICE_COUNT_FLAG.findall(environ.get("XLA_FLAGS", ""))
  if match:
    count = int(match[-1])
  try:
    import jax  # pylint: disable=g-import-not-at-top
    configured = int(jax.config.jax_num_cpu_devices)
  except (ImportError, AttributeError):
    configured = -1
  return configured if configured > 0 else count


def required_pool_size(num_devices: int) -> int:
  """Threads for one collective plus one waiting launch per device, + 2 spare."""
  return 2 * num_devices + 2


def configured_pool_size(environ: MutableMapping[str, str] = os.environ) -> int | None:
  for name in POOL_SIZE_VARIABLES:
    value = environ.get(name, "")
    if value.strip().isdigit():
      return int(value)
  return None


def configure_thread_pool(environ: MutableMapping[str, str] = os.environ) -> None:
  """Sets `PJRT_NPROC` for simulated CPU devices, before the backend starts.

  Does nothing for one device, when the pool is already large enough, or once
  a JAX backend is running (then it only warns if the pool is too small).
  """
  num_devices = simulated_device_count(environ)
  if num_devices <= 1:
    return
  needed = max(required_pool_size(num_devices), os.cpu_count() or 1)
  current = configured_pool_size(environ)
  if current is not None and current >= required_pool_size(num_devices):
    return
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized():
    logging.warning(
        "%d simulated CPU devices share a thread pool of %s threads; collectives "
        "may stall. Set PJRT_NPROC=%d before JAX starts.", num_devices,
        current or os.cpu_count(), needed)
    return
  environ["PJRT_NPROC"] = str(needed)
  logging.info("%d simulated CPU devices: PJRT_NPROC=%d threads for their "
               "collectives.", num_devices, needed)
