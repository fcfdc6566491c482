r"""Creates, runs and records a study from the search space of a config file.

  python -m tuning_playbook.sweep --config=configs/mnist1d_cnn.py \
      --study_dir=runs/cnn_lr --num_trials=64 --seed=0

writes `runs/cnn_lr/study.json` (the search space and every trial's params),
`runs/cnn_lr/trials/<trial_id>/config.json`, `runs/cnn_lr/results.csv`, and
the study's row of the tracking table (`runs/studies.csv` by default). The
config file defines `get_search_space(config, num_trials)` (see
tuning_playbook/search_space.py): the sweep calls it with the config as
resolved (every `--config.*` override applied) and --num_trials.

  --run --parallel=4       runs the trials with 4 local workers, each as
                           `python -m tuning_playbook.main` in its trial
                           directory; relaunching the same command resumes.
  --print_commands         prints one shell command per trial, to run each
                           trial as its own job on a cluster; rerunning the
                           sweep without --run then refreshes results.csv.
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
import signal
import sys
from typing import Any, Mapping

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from tuning_playbook import cli
from tuning_playbook import search_space as search_space_lib
from tuning_playbook import search_space_file
from tuning_playbook import study as study_lib
from tuning_playbook import study_runner
from tuning_playbook import tracking

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
_RUN = flags.DEFINE_bool("run", False, "Run the unfinished trials.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Trials run at once.",
                                 lower_bound=1)
_PRINT_COMMANDS = flags.DEFINE_bool(
    "print_commands", False, "Print one trainer command per trial.")
_TRACKING_TABLE = flags.DEFINE_string(
    "tracking_table", None,
    "CSV with one row per study; default <parent of study_dir>/studies.csv.")
_TRAINER_MODULE = flags.DEFINE_string(
    "trainer_module", study_lib.DEFAULT_TRAINER,
    "Module run as `python -m <module> --config=... --workdir=...`.")
_RETRY_FAILED = flags.DEFINE_bool(
    "retry_failed", False, "Run failed trials again (diverged ones stay).")


def default_tracking_table(study_dir: str) -> str:
  """`<parent of study_dir>/studies.csv`: studies side by side share it."""
  parent = os.path.dirname(os.path.normpath(study_dir)) or "."
  return os.path.join(parent, tracking.TRACKING_TABLE_FILE)


def sweep_command(config_path: str, study_dir: str, num_trials: int,
                  seed: int, overrides: Mapping[str, Any],
                  trainer_module: str) -> str:
  """The command line that reproduces (and runs) the study."""
  argv = ["python", "-m", "tuning_playbook.sweep", f"--config={config_path}",
          f"--study_dir={study_dir}", f"--num_trials={num_trials}",
          f"--seed={seed}"]
  argv += [f"--config.{k}={study_lib.format_override(v)}"
           for k, v in overrides.items()]
  if trainer_module != study_lib.DEFAULT_TRAINER:
    argv.append(f"--trainer_module={trainer_module}")
  return shlex.join(argv + ["--run"])


def _raise_system_exit(signum, frame):  # pylint: disable=unused-argument
  sys.exit(128 + signum)


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
        config_overrides=overrides, trainer_module=_TRAINER_MODULE.value)
    study_lib.write_studies(studies, config)
  except (study_lib.StudyError, search_space_lib.SearchSpaceError, ValueError) as e:
    cli.fail(str(e))
  table = _TRACKING_TABLE.value or default_tracking_table(study_dir)
  command = sweep_command(config_path, study_dir,
                          max(len(s.trials) for s in studies), _SEED.value,
                          overrides, _TRAINER_MODULE.value)

  def record(s: study_lib.Study) -> list[dict[str, Any]]:
    rows = tracking.write_results(s)
    tracking.update_tracking_table(table, tracking.study_row(s, rows, command))
    return rows

  for s in studies:
    record(s)
    logging.info("Study %s: %d trials in %s", s.name, len(s.trials),
                 s.study_dir)
  if _PRINT_COMMANDS.value:
    for s in studies:
      for t in s.trials:
        print(s.command_line(t), flush=True)
  if _RUN.value:
    signal.signal(signal.SIGTERM, _raise_system_exit)
    owner, jobs = {}, []
    # Interleaved, so every study of a scientific comparison advances evenly.
    for position in range(max(len(s.trials) for s in studies)):
      for s in studies:
        if position < len(s.trials):
          trial = s.trials[position]
          job = study_runner.TrialJob(s.trial_dir(trial),
                                      s.command(trial, sys.executable))
          owner[job.trial_dir] = s
          jobs.append(job)
    try:
      study_runner.run_trials(
          jobs, _PARALLEL.value, retry_failed=_RETRY_FAILED.value,
          on_update=lambda job: record(owner[job.trial_dir]))
    finally:
      for s in studies:
        record(s)
  for s in studies:
    rows = record(s)
    counts = {}
    for row in rows:
      counts[row["status"]] = counts.get(row["status"], 0) + 1
    logging.info("Study %s: %s; results in %s", s.name,
                 ", ".join(f"{n} {k}" for k, n in sorted(counts.items())),
                 os.path.join(s.study_dir, tracking.RESULTS_FILE))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "study_dir", "seed"])
  app.run(main, flags_parser=cli.parse_flags)
