"""A profiler trace of chosen steps of an ordinary run (`config.profile_steps`).

  config.profile_steps = "100:110"  # Steps 100 to 110, both included.

Process 0 (every process with `config.profile_all_processes`; process i > 0
under `process_<i>/`) writes to `<workdir>/profile/`: the XPlane file the
profile viewer reads (`xprof --logdir=<workdir>/profile`, or TensorBoard
with the `profile` extra), `<host>.trace.json.gz`, `perfetto_trace.json.gz`
for https://ui.perfetto.dev, and `steps.json` naming the steps traced. The
loop waits for the devices before the first traced step and after the last,
so the trace holds exactly those steps (and a log, eval or checkpoint that
falls between them). `xprof/summarize_trace.py` prints time per op category.

CLU's `periodic_actions.Profile` is not used: it stops by time as well as by
steps, does not wait for the devices, and cannot ask for the Perfetto file.
"""

from __future__ import annotations

import os
import time
from typing import Any

from absl import logging
import jax

from tuning_playbook.common import atomic_files

PROFILE_DIR = "profile"
STEPS_FILE = "steps.json"


def profile_dir(workdir: str, process_index: int) -> str:
  """Where this process writes its trace."""
  base = os.path.join(workdir, PROFILE_DIR)
  return base if process_index == 0 else os.path.join(base, f"process_{process_index}")


class StepProfiler:
  """Traces steps start..end; the loop calls it at two step counts only.

    profiler = StepProfiler((3, 5), "/tmp/run/profile", current_step=0)
    # With `done` steps done, before dispatching step done + 1:
    if done == profiler.start_after: profiler.start(state)
    # After dispatching step `done`:
    if done == profiler.stop_after: profiler.stop(state)
  """

  def __init__(self, steps: tuple[int, int] | None, directory: str,
               current_step: int):
    self.directory = directory
    self.steps = steps
    self.start_after = self.stop_after = -1  # Never equal to a step count.
    self._running = False
    if steps is None:
      return
    if current_step >= steps[0]:
      logging.info("Not profiling steps %d..%d: the run resumed at step %d.",
                   steps[0], steps[1], current_step)
      return
    self.start_after, self.stop_after = steps[0] - 1, steps[1]

  def start(self, state: Any) -> float:
    """Waits for the state, starts the trace; returns the seconds it took
    (the wait for the state, the steps' own time, not counted)."""
    jax.block_until_ready(state)
    began = time.perf_counter()
    jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
    self._running = True
    logging.info("Profiling steps %d..%d into %s.", *self.steps, self.directory)
    return time.perf_counter() - began

  def stop(self, state: Any, last_step: int | None = None) -> float:
    """Waits for the state, writes the trace; returns the seconds it took
    (the wait for the state not counted)."""
    first, last = self.steps[0], self.steps[1] if last_step is None else last_step
    jax.block_until_ready(state)
    began = time.perf_counter()
    jax.profiler.stop_trace()
    self._running = False
    atomic_files.write_json(
        os.path.join(self.directory, STEPS_FILE),
        {"first_step": first, "last_step": last,
         "process_index": jax.process_index(),
         "device_kind": jax.devices()[0].device_kind,
         "device_count": jax.device_count()})
    logging.info("Wrote the trace of steps %d..%d to %s.", first, last, self.directory)
    return time.perf_counter() - began

  def close(self, state: Any, last_step: int) -> None:
    """Stops a trace the run ended inside of (it diverged first)."""
    if self._running:
      self.stop(state, last_step)
