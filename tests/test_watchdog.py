"""The watchdog's limits, with time injected (no sleeping)."""

from tuning_playbook.training import watchdog


class _Clock:

  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def _dog(timeout, clock, fired, floor=5.0):
  return watchdog.Watchdog(timeout, floor_seconds=floor, clock=clock,
                           on_timeout=fired.append)


def test_automatic_limits_follow_the_longest_activity_of_each_kind():
  clock, fired = _Clock(), []
  dog = _dog(-1, clock, fired, floor=5.0)
  assert not dog.check()  # Nothing begun: nothing timed.
  dog.begin("step", "train step {}", 1)  # Compiles: 10 x floor.
  assert dog.limit("step") == 50.0
  clock.now = 49
  assert not dog.check()
  dog.begin("step", "train step {}", 2)  # The first step does not count.
  assert dog.limit("step") == 5.0
  clock.now = 50
  dog.begin("step", "train step {}", 3)  # Step 2 took 1 s.
  assert dog.limit("step") == 10.0  # max(floor 5, 10 x 1 s).
  assert dog.limit("eval") == 50.0  # Kinds are timed separately.
  clock.now = 59.5
  assert not dog.check()
  clock.now = 61
  assert dog.check()
  assert fired == [
      "waited 11s for train step 3 (limit 10s: max(watchdog_floor_seconds=5, "
      "10 x the longest step so far, 1s))"]


def test_the_first_of_a_kind_names_its_own_rule():
  clock, fired = _Clock(), []
  dog = _dog(-1, clock, fired, floor=3.0)
  dog.begin("eval", "the eval and checkpoint at step {}", 500)
  clock.now = 31
  assert dog.check()
  assert fired == ["waited 31s for the eval and checkpoint at step 500 (limit 30s: "
                   "the first eval may take 10 x watchdog_floor_seconds=3)"]


def test_end_stops_timing_and_fixed_or_zero_timeouts():
  clock, fired = _Clock(), []
  dog = _dog(-1, clock, fired)
  dog.begin("step", "train step {}", 1)
  dog.end()
  clock.now = 10**6
  assert not dog.check()
  fixed = _dog(7, clock, fired)
  fixed.begin("eval", "the eval and checkpoint at step {}", 10)
  assert fixed.limit("eval") == fixed.limit("step") == 7
  clock.now += 7.5
  assert fixed.check()
  assert fired[-1] == ("waited 8s for the eval and checkpoint at step 10 "
                       "(limit 7s: step_watchdog_seconds=7)")
  off = _dog(0, clock, fired)
  off.begin("step", "train step {}", 1)
  clock.now += 10**6
  assert not off.check()
  assert len(fired) == 1
