"""SIGTERM: a training loop stops at a step boundary; anything else exits at once.

  termination.install_sigterm_exit()  # In main(), after jax.distributed.
  with termination.stop_requests(deadline_seconds=60) as request:
    ...  # A loop that checks `request.requested` at its safe points, then
    ...  # saves, flushes and raises `Preempted` (exit status 143).

A Python signal handler runs only when the main thread is back in the
interpreter, which never happens while it waits in a collective or a barrier
whose peer is gone; JAX's distributed runtime also replaces the default action
of SIGTERM with a preemption notice. Here the signal wakes a helper thread
(through `signal.set_wakeup_fd`). Inside `stop_requests` the helper marks the
request and starts the deadline: a process that has not exited when it passes
(a hung peer, a stuck write) is ended as outside, where the helper runs the
registered `at_forced_exit` clean-ups (releasing study claims), writes every
thread's stack to stderr and exits with 128 + SIGTERM. A second SIGTERM ends
the process at once. Records stay whole either way: checkpoints are written
atomically by Orbax, and a torn last line of a JSON-lines log is dropped when
it is read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import os
import signal
import sys
import threading
from typing import Callable, Iterator

from absl import logging

TERMINATED_EXIT_CODE = 128 + signal.SIGTERM


class Preempted(SystemExit):
  """A run stopped on SIGTERM after saving everything; exits with 143."""

  def __init__(self, step: int):
    super().__init__(TERMINATED_EXIT_CODE)
    self.step = step


class StopRequest:
  """Set once a SIGTERM arrived while its `stop_requests` block was open."""

  def __init__(self):
    self._event = threading.Event()
    self._listeners: list[Callable[[], None]] = []
    self._lock = threading.Lock()

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def add_listener(self, listener: Callable[[], None]) -> None:
    """Calls `listener()` (on the signal's helper thread) when requested;
    at once if it already is."""
    with self._lock:
      self._listeners.append(listener)
      already = self.requested
    if already:
      listener()

  def set(self) -> None:
    with self._lock:
      self._event.set()
      listeners = list(self._listeners)
    for listener in listeners:
      try:
        listener()
      except Exception:  # pylint: disable=broad-except
        logging.exception("A stop-request listener failed.")


@dataclasses.dataclass
class _Handling:
  """What the helper thread does on SIGTERM: the open request, if any."""
  request: StopRequest | None = None
  deadline_seconds: float = 0.0
  cleanups: list[Callable[[], None]] = dataclasses.field(default_factory=list)
  lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


# The process's SIGTERM handling: a signal handler is per process.
_HANDLING = _Handling()


def install_sigterm_exit() -> None:
  """Installs the SIGTERM handling described above; call from the main thread.

  Call it after `jax.distributed.initialize`, which installs a handler of its
  own. Calling it again re-installs it.
  """
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
  if previous != -1:
    logging.info("SIGTERM handling replaces an earlier signal wakeup fd.")
  # A Python-level handler must be installed for the interpreter's C handler to
  # write the wakeup fd; the work happens on the helper thread.
  signal.signal(signal.SIGTERM, lambda signum, frame: None)
  threading.Thread(target=_on_sigterm, args=(read_fd,), daemon=True,
                   name="sigterm").start()


@contextlib.contextmanager
def stop_requests(deadline_seconds: float) -> Iterator[StopRequest]:
  """While open, a SIGTERM sets the request instead of exiting; the process
  is then ended `deadline_seconds` later if it is still alive."""
  request = StopRequest()
  with _HANDLING.lock:
    outer = (_HANDLING.request, _HANDLING.deadline_seconds)
    _HANDLING.request, _HANDLING.deadline_seconds = request, deadline_seconds
  try:
    yield request
  finally:
    with _HANDLING.lock:
      _HANDLING.request, _HANDLING.deadline_seconds = outer


@contextlib.contextmanager
def at_forced_exit(cleanup: Callable[[], None]) -> Iterator[None]:
  """Runs `cleanup()` (on the helper thread) if SIGTERM ends the process
  while the block is open; it must be quick and thread-safe."""
  with _HANDLING.lock:
    _HANDLING.cleanups.append(cleanup)
  try:
    yield
  finally:
    with _HANDLING.lock:
      _HANDLING.cleanups.remove(cleanup)


def _on_sigterm(read_fd: int) -> None:
  deadline = None
  while True:
    while signal.SIGTERM not in os.read(read_fd, 64):
      pass  # Another signal (SIGINT, ...) is handled by its own handler.
    with _HANDLING.lock:
      request, seconds = _HANDLING.request, _HANDLING.deadline_seconds
    if deadline is not None or request is None or request.requested:
      _exit("Received SIGTERM")
    sys.stderr.write(
        f"Received SIGTERM (process {os.getpid()}): stopping at the next step "
        f"boundary; exiting with status {TERMINATED_EXIT_CODE} within "
        f"{seconds:g} s.\n")
    sys.stderr.flush()
    deadline = threading.Timer(seconds, _exit, args=(
        f"Still running {seconds:g} s after SIGTERM",))
    deadline.daemon = True
    deadline.start()
    request.set()


def _exit(why: str) -> None:
  with _HANDLING.lock:
    cleanups = list(_HANDLING.cleanups)
  for cleanup in cleanups:
    try:
      cleanup()
    except Exception as e:  # pylint: disable=broad-except
      sys.stderr.write(f"A clean-up before exiting failed: {e!r}\n")
  sys.stderr.write(f"{why} (process {os.getpid()}); every thread's stack "
                   f"follows. Exiting with status {TERMINATED_EXIT_CODE}.\n")
  faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
  sys.stderr.flush()
  logging.flush()
  os._exit(TERMINATED_EXIT_CODE)  # pylint: disable=protected-access
