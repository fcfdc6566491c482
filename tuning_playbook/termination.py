"""SIGTERM ends the process within seconds, even while it waits in native code.

A Python signal handler runs only when the main thread is back in the
interpreter, which never happens while it waits in a collective or a barrier
whose peer is gone; JAX's distributed runtime also replaces the default action
of SIGTERM with a preemption notice. Here the signal wakes a helper thread
(through `signal.set_wakeup_fd`), which writes every thread's stack to stderr
and exits with 128 + SIGTERM. Records stay as they were: checkpoints are
written atomically by Orbax, and a torn last line of a JSON-lines log is
dropped when it is read.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading

from absl import logging

TERMINATED_EXIT_CODE = 128 + signal.SIGTERM


def install_sigterm_exit() -> None:
  """Makes SIGTERM dump every thread's stack and exit; call from the main thread.

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
  threading.Thread(target=_exit_on_sigterm, args=(read_fd,), daemon=True,
                   name="sigterm-exit").start()


def _exit_on_sigterm(read_fd: int) -> None:
  while signal.SIGTERM not in os.read(read_fd, 64):
    pass  # Another signal (SIGINT, ...) is handled by its own handler.
  message = (f"Received SIGTERM (process {os.getpid()}); every thread's stack "
             f"follows. Exiting with status {TERMINATED_EXIT_CODE}.\n")
  sys.stderr.write(message)
  faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
  sys.stderr.flush()
  logging.flush()
  os._exit(TERMINATED_EXIT_CODE)  # pylint: disable=protected-access
