"""The step watchdog's cadence logic, with time injected (no sleeping)."""

from tuning_playbook import watchdog


class _Clock:

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_fires_only_after_the_timeout_without_progress():
  clock, fired = _Clock(), []
  dog = watchdog.StepWatchdog(10, clock=clock, on_timeout=fired.append)
  assert not dog.check()  # Not armed before the first step.
  clock.now = 100
  assert not dog.check()
  dog.progress(1)
  clock.now = 109
  assert not dog.check()
  dog.progress(2)
  clock.now = 118
  assert not dog.check()
  clock.now = 120.5
  assert dog.check()
  assert fired == ["no training progress for 12s after step 2 (step_watchdog_seconds=10)"]


def test_paused_during_evals_and_disabled_at_zero():
  clock, fired = _Clock(), []
  dog = watchdog.StepWatchdog(10, clock=clock, on_timeout=fired.append)
  dog.progress(5)
  dog.pause()
  clock.now = 1000  # A long eval.
  assert not dog.check()
  dog.progress(5)
  clock.now = 1011
  assert dog.check()
  off = watchdog.StepWatchdog(0, clock=clock, on_timeout=fired.append)
  off.progress(1)
  clock.now = 10**6
  assert not off.check()
  assert len(fired) == 1
