r"""Creates, runs and records a study from the search space of a config file.

  python -m tuning_playbook.sweep --config=configs/mnist1d_cnn.py \
      --study_dir=runs/cnn_lr --num_trials=64 --seed=0

writes `runs/cnn_lr/study.json` (the search space and every trial's params),
`runs/cnn_lr/trials/<trial_id>/config.json`, `runs/cnn_lr/results.csv`, and
the study's row of the tracking table (`runs/studies.csv` by default). The
config file defines `get_search_space(config, num_trials)` (see
tuning_playbook/studies/search_space.py): the sweep calls it with the config as
resolved (every `--config.*` override applied) and --num_trials.

  --run --parallel=4       runs the trials in 4 local study workers
                           (study_worker.py: long-lived processes that keep
                           imports, data and compiled steps from trial to
                           trial); relaunching the same command resumes.
                           On GPUs or TPU chips each worker owns
                           --devices_per_worker of them (default 1), and
                           --parallel defaults to as many workers as fit.
  --vectorize=8            each worker trains up to 8 trials of one structure
                           at once as one compiled program (population.py).
  --isolation=process      one `python -m tuning_playbook.main` process per
                           trial instead (used for a custom --trainer_module).
  --print_commands         prints one shell command per trial, to run each
                           trial as its own job on a cluster; rerunning the
                           sweep without --run then refreshes results.csv.
  --run --worker           a worker: claims unfinished trials one at a time
                           (--parallel at once) and exits when none is left;
                           any number of workers on any machines sharing the
                           study directory never run a trial twice.
  --emit_slurm=FILE        writes an sbatch job-array script of
                           --slurm_workers such workers (--slurm_directive
                           adds #SBATCH lines); submit it with `sbatch FILE`.
  --config.<key>=<value>   overrides applied to every trial.

A larger --num_trials with the same seed extends the study; a different seed,
search space, config or override is refused, to keep earlier results (a
search space that depends on the budget may differ at a larger one). Trial
commands name the config and study paths as given, so they run from the
directory the sweep was launched in.
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any, Mapping

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from tuning_playbook.common import cli
from tuning_playbook.common import json_records
from tuning_playbook.studies import commands
from tuning_playbook.studies import search_space as search_space_lib
from tuning_playbook.studies import search_space_file
from tuning_playbook.studies import slurm
from tuning_playbook.studies import study as study_lib
from tuning_playbook.studies import study_flags
from tuning_playbook.studies import study_launch

flags.adopt_module_key_flags(study_flags)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "Config file; its get_search_space(config, num_trials) defines the study.",
    lock_config=True)
_STUDY_DIR = flags.DEFINE_string("study_dir", None, "Directory of the study.")
_NUM_TRIALS = flags.DEFINE_integer(
    "num_trials", None, "Number of trials (default for a grid: all points).",
    lower_bound=1)
_SEED = flags.DEFINE_integer("seed", None, "Seed of the search sequence.",
                             lower_bound=0)
_WORKER = flags.DEFINE_bool(
    "worker", False, "With --run: leave trials other runners claimed and exit "
    "when no unclaimed unfinished trial is left.")
_EMIT_SLURM = flags.DEFINE_string(
    "emit_slurm", None, "Write an sbatch job-array script of workers here.")
_SLURM_WORKERS = flags.DEFINE_integer(
    "slurm_workers", 4, "Array tasks (workers) of --emit_slurm.", lower_bound=1)
_SLURM_DIRECTIVES = flags.DEFINE_multi_string(
    "slurm_directive", [], "An extra #SBATCH option of --emit_slurm, e.g. "
    "--slurm_directive=--gres=gpu:1 (repeatable).")
_SLURM_CPUS_PER_TASK = flags.DEFINE_integer(
    "slurm_cpus_per_task", slurm.DEFAULT_CPUS_PER_TASK,
    "CPU cores per array task of --emit_slurm (input pipelines, JAX's host "
    "threads).", lower_bound=1)



def sweep_command(config_path: str, study_dir: str, num_trials: int,
                  seed: int, overrides: Mapping[str, Any],
                  trainer_module: str) -> str:
  """The command line that reproduces (and runs) the study."""
  return commands.command_line(commands.module_argv(
      "tuning_playbook.sweep",
      [f"--config={config_path}", f"--study_dir={study_dir}",
       f"--num_trials={num_trials}", f"--seed={seed}"],
      overrides=overrides, trainer_module=trainer_module, run=True))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config_path = config_flags.get_config_filename(flags.FLAGS["config"])
  overrides = dict(config_flags.get_override_values(flags.FLAGS["config"]))
  study_dir = _STUDY_DIR.value
  config = cli.loaded_config(_CONFIG)
  try:
    studies = study_lib.plan_studies(
        config_path=config_path, config=config,
        spec=search_space_file.load(config_path, config, _NUM_TRIALS.value),
        study_dir=study_dir,
        num_trials=_NUM_TRIALS.value, seed=_SEED.value,
        config_overrides=overrides, trainer_module=study_flags.TRAINER_MODULE.value)
    study_lib.write_studies(studies, config)
  except (study_lib.StudyError, search_space_lib.SearchSpaceError, ValueError) as e:
    cli.fail(str(e))
  for s in studies:
    warning = search_space_lib.batch_size_warning(s.search_space)
    if warning:
      logging.warning("Study %s: %s.", s.name, warning)
  command = sweep_command(config_path, study_dir,
                          max(len(s.trials) for s in studies), _SEED.value,
                          overrides, study_flags.TRAINER_MODULE.value)
  if _EMIT_SLURM.value:
    _write_slurm_script(_EMIT_SLURM.value, command, study_dir)
  try:
    study_launch.launch(studies, study_flags.launch_options(
        study_dir, command, run=_WORKER.value, worker=_WORKER.value))
  except (study_launch.LaunchError, json_records.RecordFileError) as e:
    cli.fail(str(e))


def _write_slurm_script(path: str, command: str, study_dir: str) -> None:
  """Writes the job array whose tasks run this study's worker command."""
  argv = [sys.executable] + shlex.split(command)[1:] + ["--worker"]
  if study_flags.PARALLEL.value is not None:
    argv.append(f"--parallel={study_flags.PARALLEL.value}")
  if study_flags.DEVICES_PER_WORKER.value is not None:
    argv.append(f"--devices_per_worker={study_flags.DEVICES_PER_WORKER.value}")
  if study_flags.SHARE_DEVICES.value:
    argv.append("--share_devices")
  if study_flags.RETRY_FAILED.value:
    argv.append("--retry_failed")
  if study_flags.VECTORIZE.value > 1:
    argv.append(f"--vectorize={study_flags.VECTORIZE.value}")
  if study_flags.ISOLATION.value != "auto":
    argv.append(f"--isolation={study_flags.ISOLATION.value}")
  if study_flags.TRACKING_TABLE.value:
    argv.append(f"--tracking_table={study_flags.TRACKING_TABLE.value}")
  log_dir = os.path.abspath(os.path.join(study_dir, "slurm"))
  os.makedirs(log_dir, exist_ok=True)
  text = slurm.job_array_script(
      argv, num_workers=_SLURM_WORKERS.value,
      job_name=os.path.basename(os.path.normpath(study_dir)), log_dir=log_dir,
      workdir=os.getcwd(), directives=_SLURM_DIRECTIVES.value,
      cpus_per_task=_SLURM_CPUS_PER_TASK.value)
  try:
    with open(path, "w") as f:
      f.write(text)
  except OSError as e:
    cli.fail(f"--emit_slurm={path}: {e}")
  print(f"Wrote {path}: submit it with `sbatch {path}`", flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "study_dir", "seed"])
  app.run(main, flags_parser=cli.parse_flags)
