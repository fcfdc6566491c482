"""Command-line flags shared by the study launchers (`sweep`, `playbook`):
whether and how to run a study's trials, and where its row goes."""

from typing import Any

from absl import flags

from tuning_playbook.studies import commands
from tuning_playbook.studies import study_launch

RUN = flags.DEFINE_bool("run", False, "Run the unfinished trials.")
PARALLEL = flags.DEFINE_integer(
    "parallel", None, "Trials (trial processes, or study workers) run at once; "
    "default 1, or for study workers on GPUs or TPU chips as many as "
    "--devices_per_worker allows.", lower_bound=1)
DEVICES_PER_WORKER = flags.DEFINE_integer(
    "devices_per_worker", None, "With --run on a host with GPUs or TPU chips: "
    "the devices each study worker owns (its CUDA_VISIBLE_DEVICES or "
    "TPU_VISIBLE_CHIPS); default 1, one worker per device. Not for CPU hosts, "
    "where every worker sees every device.", lower_bound=1)
SHARE_DEVICES = flags.DEFINE_bool(
    "share_devices", False, "With --run on GPUs: allow --parallel above the "
    "groups of --devices_per_worker GPUs; workers sharing a GPU each "
    "preallocate their part of its memory.")
PRINT_COMMANDS = flags.DEFINE_bool(
    "print_commands", False, "Print one trainer command per trial.")
TRACKING_TABLE = flags.DEFINE_string(
    "tracking_table", None,
    "CSV with one row per study; default <parent of study_dir>/studies.csv.")
TRAINER_MODULE = flags.DEFINE_string(
    "trainer_module", commands.DEFAULT_TRAINER,
    "Module run as `python -m <module> --config=... --workdir=...`.")
RETRY_FAILED = flags.DEFINE_bool(
    "retry_failed", False, "Run failed trials again (diverged ones stay).")
VECTORIZE = flags.DEFINE_integer(
    "vectorize", 1, "With --run: train up to this many trials of one structure "
    "at once, as one compiled program (population.py).", lower_bound=1)
ISOLATION = flags.DEFINE_enum(
    "isolation", "auto", ["auto", "worker", "process"],
    "With --run: `worker` trains trials one after another (or --vectorize at "
    "a time) in --parallel long-lived worker processes; `process` starts one "
    "trainer process per trial (for flaky user code, custom --trainer_module "
    "and procedures that stop early); `auto` picks worker unless one of those "
    "needs process.")


def launch_options(study_dir: str, command: str, *, run: bool = False,
                   **extra: Any) -> study_launch.LaunchOptions:
  """The launch these flags ask for (`run` adds to --run; `extra`: what only
  one launcher sets, such as `worker` or `stop_rule`)."""
  return study_launch.LaunchOptions(
      table=TRACKING_TABLE.value or study_launch.default_tracking_table(study_dir),
      command=command, print_commands=PRINT_COMMANDS.value,
      run=RUN.value or run, parallel=PARALLEL.value,
      retry_failed=RETRY_FAILED.value, vectorize=VECTORIZE.value,
      isolation=ISOLATION.value, devices_per_worker=DEVICES_PER_WORKER.value,
      share_devices=SHARE_DEVICES.value, **extra)
