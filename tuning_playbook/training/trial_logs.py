"""Which trial a log line is about, for the `log.txt` of each trial of a
population.

  with trial_logs.about(trial_dir):
    logging.info(...)  # Goes to this trial's log.txt only.
  handler.addFilter(trial_logs.OnlyAbout(trial_dir))

Lines logged outside `about` (the population's own) go to every trial's log.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Iterator

_TRIAL_DIR: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "trial_dir", default=None)


@contextlib.contextmanager
def about(trial_dir: str) -> Iterator[None]:
  """Marks the lines logged meanwhile (in this thread) as about this trial."""
  token = _TRIAL_DIR.set(trial_dir)
  try:
    yield
  finally:
    _TRIAL_DIR.reset(token)


class OnlyAbout(logging.Filter):
  """Passes the lines about this trial and those about no trial in particular."""

  def __init__(self, trial_dir: str):
    super().__init__()
    self.trial_dir = trial_dir

  def filter(self, record: logging.LogRecord) -> bool:
    about_trial = _TRIAL_DIR.get()
    return about_trial is None or about_trial == self.trial_dir
