"""The step at which every process of a job stops after a SIGTERM reached any.

  with termination.stop_requests(deadline) as request, preemption.StopStep(
      request, start_step=step, name=workdir, timeout_seconds=deadline) as stop:
    while ...:
      if stop.reached(step):  # At each step boundary: a lock and a compare.
        break  # Save a checkpoint at `step`: every process is at it.
      ...

One process: it stops at the first boundary after the signal. Several: the
protocol of JAX's preemption sync point (`multihost_utils.
reached_preemption_sync_point`), over the same coordination service. The
process that got the signal posts a notice; a watcher thread in every process
sees it and posts the step that process will check next (its main thread may
be blocked meanwhile, in a fetch that waits for a peer); the stop step is the
largest posted, a step every process reaches without waiting for another.
The framework's SIGTERM handling (termination.py) replaces JAX's own notice.
"""

from __future__ import annotations

import hashlib
import threading

from absl import logging
import jax

from tuning_playbook.common import termination

# How often the watcher asks for a notice; closing waits up to this long
# (its thread must be out of the client before JAX shuts the client down).
_POLL_MS = 200


def _client():
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state.client


class StopStep:
  """Decides, at step boundaries, whether this process stops there."""

  def __init__(self, request: termination.StopRequest, *, start_step: int,
               name: str, timeout_seconds: float):
    self._lock = threading.Lock()
    self._next_check = start_step  # The boundary the main thread checks next.
    self._posted: int | None = None  # This process's step, once noticed.
    self._target: int | None = None
    self._timeout_seconds = timeout_seconds
    self._closed = threading.Event()
    self._client = _client() if jax.process_count() > 1 else None
    self._prefix = f"tuning_playbook/stop/{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    self._watcher = None
    if self._client is not None:
      self._watcher = threading.Thread(target=self._watch, daemon=True,
                                       name="stop-watch")
      self._watcher.start()
      request.add_listener(self._post_notice)
    else:
      request.add_listener(self._noticed)

  def __enter__(self) -> "StopStep":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def reached(self, step: int) -> bool:
    """Whether to stop at `step` (`step` steps done, the next not started)."""
    with self._lock:
      self._next_check = step + 1
      posted = self._posted
    if posted is None:
      return False
    if self._target is None:
      self._target = self._agree(posted)
      logging.warning("Stopping at step %d on SIGTERM (this process was at "
                      "step %d).", self._target, step)
    return step >= self._target

  def close(self) -> None:
    """Stops the watcher and waits for it to leave the client."""
    self._closed.set()
    if self._watcher is not None:
      self._watcher.join()

  def _noticed(self) -> None:
    """The notice reached this process: posts the step it checks next."""
    with self._lock:
      if self._posted is not None:
        return
      self._posted = self._next_check
      if self._client is not None:
        self._client.key_value_set(
            f"{self._prefix}/step/{jax.process_index()}", str(self._posted))

  def _post_notice(self) -> None:
    self._client.key_value_set(f"{self._prefix}/notice",
                               str(jax.process_index()), allow_overwrite=True)
    self._noticed()

  def _watch(self) -> None:
    while not self._closed.is_set():
      try:
        self._client.blocking_key_value_get(f"{self._prefix}/notice", _POLL_MS)
      except Exception:  # pylint: disable=broad-except
        continue  # Not posted yet (or the client is shutting down).
      self._noticed()
      return

  def _agree(self, posted: int) -> int:
    """The largest step any process posted: every process stops there."""
    if self._client is None:
      return posted
    timeout_ms = int(self._timeout_seconds * 1000)
    steps = [int(self._client.blocking_key_value_get(
        f"{self._prefix}/step/{i}", timeout_ms)) for i in range(jax.process_count())]
    return max(steps)
