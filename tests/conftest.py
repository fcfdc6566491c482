"""Test setup: in-process tests see 4 simulated CPU devices (data parallel)."""

import os

NUM_TEST_DEVICES = 4

if "jax" not in __import__("sys").modules:
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count={NUM_TEST_DEVICES}").strip()
  from tuning_playbook import cpu_devices  # pylint: disable=g-import-not-at-top
  cpu_devices.configure_thread_pool()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_collection_modifyitems(items):
  """Modules with end-to-end runs (marked `slow`) first, each kept whole: the
  xdist workers, handed tests in this order, then end on short tests together."""
  slow_modules = {item.module.__name__ for item in items
                  if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.module.__name__ not in slow_modules)
