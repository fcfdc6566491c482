"""Retrospective best-N checkpointing with Orbax: keep best-N ∪ latest.

Retention is the union of two Orbax preservation policies: the latest
checkpoint (for resumption) and the `num_best_checkpoints` best ones by the
configured eval metric. A NaN/Inf metric ranks worst; the stored metric value
itself is left as it is. Checkpoints are written to a temporary directory and
renamed when complete, and deletions are renames into `todelete/` that are
purged afterwards, so a kill at any moment leaves only whole checkpoints.

Orbax renames into `todelete/` from the thread that finalizes an asynchronous
save. `todelete/` is therefore purged only when no save is in flight: before
the manager exists, after `wait_until_finished()`, and after `close()`.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_managers

_TODELETE = "todelete"


def rank_key(value: float | None, mode: str) -> float:
  """Larger is better; non-finite and missing values rank worst."""
  if value is None or not math.isfinite(value):
    return -math.inf
  return -value if mode == "min" else value


def checkpoint_rank(value: float | None, step: int, mode: str) -> tuple[float, int]:
  """Larger is better; among equal values the earlier step is better.

  The same order decides which checkpoints are kept and which is the best, so
  the best checkpoint is always among those kept.
  """
  return rank_key(value, mode), -step


def _remove_tree(path: str) -> None:
  """Removes `path` recursively; missing entries are fine, other errors logged."""

  def on_error(func, failed_path, exc):
    del func  # Unused.
    error = exc if isinstance(exc, BaseException) else exc[1]  # exc_info < 3.12.
    if not isinstance(error, FileNotFoundError):
      logging.warning("Could not remove %s: %s", failed_path, error)

  if sys.version_info >= (3, 12):
    shutil.rmtree(path, onexc=on_error)  # pylint: disable=unexpected-keyword-arg
  else:
    shutil.rmtree(path, onerror=on_error)


class Checkpointer:
  """Saves {train state, JSON metadata}; restores the latest to a target."""

  def __init__(self, directory: str, *, num_best: int, best_metric: str,
               best_mode: str):
    self.directory = os.path.abspath(directory)
    self._purge_deleted()
    self._best_metric = best_metric
    policy = ocp_managers.AnyPreservationPolicy([
        ocp_managers.LatestN(n=1),
        ocp_managers.BestN(
            get_metric_fn=lambda m: checkpoint_rank(
                m.get(best_metric), m["step"], best_mode),
            reverse=False, n=num_best, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy,
        # Orbax writes a checkpoint's metrics to disk only when best_fn is set;
        # without them a restarted manager would rank old checkpoints as
        # metric-less and delete the best ones.
        best_fn=lambda m: checkpoint_rank(m.get(best_metric), m["step"], best_mode),
        best_mode="max",
        create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=True, todelete_subdir=_TODELETE,
        # Deletions then run in the save's finalize thread, which
        # wait_until_finished() joins; a background deleter would be joined
        # only by close() and could rename into todelete/ during a purge.
        enable_background_delete=False)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "meta"))

  def _purge_deleted(self) -> None:
    """Removes `todelete/`; callers make sure no save is in flight."""
    if jax.process_index() != 0:
      return
    _remove_tree(os.path.join(self.directory, _TODELETE))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, meta: dict[str, Any],
           metrics: dict[str, float] | None) -> None:
    """Starts an asynchronous save; raises any error of an earlier one.

    `metrics=None` saves a checkpoint that is not an eval (a preemption's):
    kept while it is the latest, never one of the best.

    Waits for the previous save first, as Orbax would, so that its deletions
    are done before `todelete/` is purged.
    """
    self._manager.wait_until_finished()
    self._manager.check_for_errors()
    self._purge_deleted()  # What earlier saves' retention set aside.
    self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)),
        metrics=None if metrics is None else {**metrics, "step": step},
        force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores `step` with the shardings of `abstract_state`."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def wait(self) -> None:
    """Blocks until pending saves finish; raises their errors."""
    self._manager.wait_until_finished()
    self._manager.check_for_errors()
    self._purge_deleted()

  def close(self) -> None:
    """Waits for pending saves and their deletions, then purges them."""
    self._manager.close()
    self._purge_deleted()
