"""Trains one configuration.

  python -m tuning_playbook.main --config=configs/mnist1d_cnn.py --workdir=/tmp/run \
      [--config.optimizer.learning_rate=0.1 ...]

Relaunching the same command resumes from the latest checkpoint; a finished
run is left as it is.
"""

import sys

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from tuning_playbook.common import cli
from tuning_playbook.common import config_validation
from tuning_playbook.common import cpu_devices
from tuning_playbook.common import platform_check
from tuning_playbook.common import termination
from tuning_playbook import config_schema
from tuning_playbook.training import distributed
from tuning_playbook import workload as workload_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/<name>.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run's records.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "HOST:PORT of process 0 for a multi-process job.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index.")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout_seconds", 300, "Time to wait for every process to join.")
_REQUIRE_ACCELERATOR = flags.DEFINE_bool(
    "require_accelerator", False,
    "Exit with status 2 when JAX finds no GPU or TPU (as config.require_accelerator).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.quiet_library_logs()
  config = cli.loaded_config(_CONFIG)
  try:  # The config's own values and workload first, before the trainer's imports.
    config_validation.validate(config)
    workload_lib.load_workload(config.workload)
  except (config_schema.ConfigError, workload_lib.UnknownWorkloadError) as e:
    cli.fail(str(e))
  from tuning_playbook.training import run  # pylint: disable=g-import-not-at-top
  cpu_devices.configure_thread_pool()  # Before the backend starts.
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                           _PROCESS_ID.value, _INIT_TIMEOUT.value)
  except ValueError as e:
    cli.fail(str(e))
  except (distributed.CoordinatorUnreachableError, distributed.ClusterJoinError) as e:
    sys.exit(f"Error: {e}")
  termination.install_sigterm_exit()  # After JAX's own SIGTERM handler.
  _check_platform(config)
  try:
    summary = run.run_trial(config, _WORKDIR.value)
  except run.BAD_INPUT_ERRORS as e:
    cli.fail(str(e))
  logging.info("Finished: %s", summary)


def _check_platform(config: ml_collections.ConfigDict) -> None:
  """Logs what JAX runs on; exits 2 when an accelerator is required and absent."""
  asked_by = ("--require_accelerator" if _REQUIRE_ACCELERATOR.value
              else "config.require_accelerator")
  required = _REQUIRE_ACCELERATOR.value or config.require_accelerator
  try:
    platform_check.check_platform(required, asked_by)
  except platform_check.NoAcceleratorError as e:
    cli.fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
