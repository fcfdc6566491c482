"""Test setup: in-process tests see 4 simulated CPU devices (data parallel).

The harness sizes the XLA:CPU thread pool of this process for its devices
(`PJRT_NPROC`, read once, when the backend starts) and then removes the
variable again, so that no subprocess a test starts inherits it: a trainer,
study worker or sweep must size its own pool (tests/test_thread_pools.py).
Every program the tests compile, here or in the processes they start
(`helpers.subprocess_env`), is compiled without LLVM's optimisations
(`helpers.FAST_COMPILE`): the tests' tiny models compile far more than they
compute, and runs are compared only with runs compiled the same way.
TFDS data sets built by tests go to a directory of the session
(`TFDS_DATA_DIR`), never to the user's `~/tensorflow_datasets`.

Each test process keeps the programs it compiles in a persistent compilation
cache of its own (a temporary directory, removed at the end, set through
`jax.config`): the many trainers that tests build in-process (a trial alone
beside its population, say) compile the same programs, and a hit returns the
same executable. The trainers, workers and sweeps that tests start share
another, the session's (`JAX_COMPILATION_CACHE_DIR`, as a user would set it:
dozens of runs of the same tiny config compile the same programs). It
replaces a study's own cache; the test of that cache removes the variable
(tests/test_study_workers.py).
"""

import os
import shutil
import tempfile

NUM_TEST_DEVICES = 4
# What the harness sets for this process only.
HARNESS_ONLY_VARIABLES = ("PJRT_NPROC", "NPROC")

if "jax" not in __import__("sys").modules:
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    from tests import helpers  # pylint: disable=g-import-not-at-top
    os.environ["XLA_FLAGS"] = f"{flags} {helpers.xla_flags(NUM_TEST_DEVICES)}".strip()
  _inherited = {name: os.environ.get(name) for name in HARNESS_ONLY_VARIABLES}
  from tuning_playbook.common import cpu_devices  # pylint: disable=g-import-not-at-top
  cpu_devices.configure_thread_pool()
  import jax  # pylint: disable=g-import-not-at-top
  jax.devices()  # The backend starts here, with the pool sized.
  _COMPILATION_CACHE = tempfile.mkdtemp(prefix="tuning_playbook_tests_jax_cache_")
  jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  for _name, _value in _inherited.items():
    if _value is None:
      os.environ.pop(_name, None)
    else:
      os.environ[_name] = _value
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_SESSION_DIRS_OWNER = "TUNING_PLAYBOOK_TESTS_SESSION_DIRS_OWNER"
# JAX's persistent compilation cache, as its environment variables set it.
_SUBPROCESS_CACHE_VARIABLES = ("JAX_COMPILATION_CACHE_DIR",
                               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                               "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")


def pytest_configure(config):
  """Directories of the test session, shared by its xdist workers and every
  process a test starts (they inherit the environment of the process that
  starts them): one TFDS data directory, and one persistent compilation
  cache for the trainers, workers and sweeps the tests start (a hit is the
  executable the same program compiled to before; a test of the product's
  own caches removes the variable)."""
  del config  # Unused.
  if os.environ.get(_SESSION_DIRS_OWNER):
    return  # An xdist worker: the controller made them.
  os.environ[_SESSION_DIRS_OWNER] = str(os.getpid())
  if "TFDS_DATA_DIR" not in os.environ:
    os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="tuning_playbook_tfds_")
    os.environ[_SESSION_DIRS_OWNER + "_TFDS"] = "1"
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ.update(zip(_SUBPROCESS_CACHE_VARIABLES, (
        tempfile.mkdtemp(prefix="tuning_playbook_tests_subprocess_jax_cache_"),
        "0", "-1")))
    os.environ[_SESSION_DIRS_OWNER + "_CACHE"] = "1"


def pytest_unconfigure(config):
  del config  # Unused.
  cache = globals().get("_COMPILATION_CACHE")
  if cache:
    shutil.rmtree(cache, ignore_errors=True)
  if os.environ.get(_SESSION_DIRS_OWNER) == str(os.getpid()):
    if os.environ.get(_SESSION_DIRS_OWNER + "_TFDS"):
      shutil.rmtree(os.environ["TFDS_DATA_DIR"], ignore_errors=True)
    if os.environ.get(_SESSION_DIRS_OWNER + "_CACHE"):
      shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(items):
  """Modules with end-to-end runs (marked `slow`) first, each kept whole: the
  xdist workers, handed tests in this order, then end on short tests together."""
  slow_modules = {item.module.__name__ for item in items
                  if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.module.__name__ not in slow_modules)
