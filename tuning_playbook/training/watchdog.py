"""A watchdog: an activity that runs far longer than before dumps every stack and exits.

A hung collective (a host that died or stopped, unequal batch counts) otherwise
blocks a multi-host job forever. The training loop names what it is doing
(`begin("step", "train step {}", 12)`, `begin("eval", "the eval and checkpoint
at step {}", 500)`); each kind of activity gets a time limit:

- automatic (`timeout_seconds < 0`, the default): the longest time one
  activity of that kind has taken so far, times `factor`, but at least
  `floor_seconds`; the first activity of a kind (it compiles) gets
  `first_factor * floor_seconds` and does not count as the longest.
- fixed (`timeout_seconds > 0`): that many seconds for every activity.
- off (`timeout_seconds == 0`).

On timeout it names the activity, how long it waited and the limit, dumps
every thread's stack and exits with status 42.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import os
import sys
import threading
import time
from typing import Callable

from absl import logging

WATCHDOG_EXIT_CODE = 42
AUTO_FACTOR = 10.0  # Limit = this x the longest activity of its kind so far.
FIRST_FACTOR = 10.0  # First of a kind (with its compilation): this x the floor.


@dataclasses.dataclass
class _Activity:
  kind: str
  template: str  # str.format template of the description, filled on timeout.
  args: tuple
  start: float


class Watchdog:
  """Usage: `with Watchdog(-1, floor_seconds=300) as dog: dog.begin(kind, "...")`."""

  def __init__(self, timeout_seconds: float, *, floor_seconds: float = 300.0,
               factor: float = AUTO_FACTOR, first_factor: float = FIRST_FACTOR,
               clock: Callable[[], float] = time.monotonic,
               on_timeout: Callable[[str], None] | None = None):
    self._timeout = timeout_seconds
    self._floor = floor_seconds
    self._factor = factor
    self._first_factor = first_factor
    self._clock = clock
    self._on_timeout = on_timeout or _dump_and_exit
    self._seen: set[str] = set()
    self._longest: dict[str, float] = {}
    self._activity: _Activity | None = None
    self._lock = threading.Lock()
    self._stop = threading.Event()

  @property
  def enabled(self) -> bool:
    return self._timeout != 0

  def begin(self, kind: str, template: str, *args) -> None:
    """Ends the current activity (recording its duration) and starts another.

    Its description is `template.format(*args)`, built only on a timeout (this
    runs once per training step).
    """
    now = self._clock()
    with self._lock:
      self._finish(now)
      self._activity = _Activity(kind, template, args, now)

  def end(self) -> None:
    """Ends the current activity; nothing is timed until the next `begin`."""
    with self._lock:
      self._finish(self._clock())
      self._activity = None

  def limit(self, kind: str) -> float:
    """Seconds an activity of `kind` may take now."""
    if self._timeout > 0:
      return self._timeout
    if kind not in self._seen:
      return self._first_factor * self._floor
    return max(self._floor, self._factor * self._longest.get(kind, 0.0))

  def check(self) -> bool:
    """True (after calling on_timeout) if the current activity ran past its limit."""
    if not self.enabled:
      return False
    with self._lock:
      activity = self._activity
      if activity is None:
        return False
      waited = self._clock() - activity.start
      limit = self.limit(activity.kind)
      first = activity.kind not in self._seen
      longest = self._longest.get(activity.kind, 0.0)
    if waited <= limit:
      return False
    if self._timeout > 0:
      rule = f"step_watchdog_seconds={self._timeout:g}"
    elif first:
      rule = (f"the first {activity.kind} may take {self._first_factor:g} x "
              f"watchdog_floor_seconds={self._floor:g}")
    else:
      rule = (f"max(watchdog_floor_seconds={self._floor:g}, {self._factor:g} x "
              f"the longest {activity.kind} so far, {longest:.3g}s)")
    description = activity.template.format(*activity.args)
    self._on_timeout(f"waited {waited:.0f}s for {description} "
                     f"(limit {limit:.0f}s: {rule})")
    return True

  def __enter__(self) -> "Watchdog":
    """Starts watching (again: durations seen so far are kept)."""
    self._stop = threading.Event()
    if self.enabled:
      threading.Thread(target=self._run, args=(self._stop,), daemon=True,
                       name="watchdog").start()
    return self

  def __exit__(self, *exc) -> None:
    self.end()
    self._stop.set()

  def _finish(self, now: float) -> None:
    if self._activity is None:
      return
    kind, took = self._activity.kind, now - self._activity.start
    if kind in self._seen:
      self._longest[kind] = max(self._longest.get(kind, 0.0), took)
    self._seen.add(kind)

  def _run(self, stop: threading.Event) -> None:
    period = min(self._timeout if self._timeout > 0 else self._floor, 40.0) / 4
    while not stop.wait(period):
      if self.check():
        return


def _dump_and_exit(message: str) -> None:
  logging.error("Watchdog: %s; dumping stacks and exiting.", message)
  sys.stderr.write(f"Watchdog: {message}. Every thread's stack follows; exiting "
                   f"with status {WATCHDOG_EXIT_CODE}.\n")
  faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
  sys.stderr.flush()
  logging.flush()
  os._exit(WATCHDOG_EXIT_CODE)  # pylint: disable=protected-access
