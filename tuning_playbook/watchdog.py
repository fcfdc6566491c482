"""A step watchdog: no progress for too long dumps every thread's stack and exits.

A hung collective (a host that died, unequal batch counts) otherwise blocks a
multi-host job forever. The watchdog times training steps only: it arms at the
first reported step (the first compilation does not count) and is paused
during evals and checkpoints.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from typing import Callable

from absl import logging

WATCHDOG_EXIT_CODE = 42


class StepWatchdog:
  """Usage: `with StepWatchdog(600) as dog: ... dog.progress(step)`.

  With `timeout_seconds <= 0` it does nothing.
  """

  def __init__(self, timeout_seconds: float, *,
               clock: Callable[[], float] = time.monotonic,
               on_timeout: Callable[[str], None] | None = None):
    self._timeout = timeout_seconds
    self._clock = clock
    self._on_timeout = on_timeout or _dump_and_exit
    self._last = None
    self._step = None
    self._stop = threading.Event()
    self._thread = None

  def progress(self, step: int) -> None:
    self._step, self._last = step, self._clock()

  def pause(self) -> None:
    """Stops timing until the next `progress` (e.g. during an eval)."""
    self._last = None

  def check(self) -> bool:
    """True (after calling on_timeout) if no progress came within the timeout."""
    if self._timeout <= 0 or self._last is None:
      return False
    idle = self._clock() - self._last
    if idle > self._timeout:
      self._on_timeout(
          f"no training progress for {idle:.0f}s after step {self._step} "
          f"(step_watchdog_seconds={self._timeout})")
      return True
    return False

  def __enter__(self) -> "StepWatchdog":
    if self._timeout > 0:
      self._thread = threading.Thread(target=self._run, daemon=True,
                                      name="step-watchdog")
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()

  def _run(self) -> None:
    while not self._stop.wait(min(self._timeout / 4, 10.0)):
      if self.check():
        return


def _dump_and_exit(message: str) -> None:
  logging.error("Step watchdog: %s; dumping stacks and exiting.", message)
  sys.stderr.write(f"Step watchdog: {message}\n")
  faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
  sys.stderr.flush()
  os._exit(WATCHDOG_EXIT_CODE)  # pylint: disable=protected-access
