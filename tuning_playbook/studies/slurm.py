"""SLURM job-array scripts whose tasks are study workers.

  script = slurm.job_array_script(["python", "-m", "tuning_playbook.sweep",
                                   ..., "--run", "--worker"],
                                  num_workers=8, job_name="cnn_study",
                                  log_dir="runs/cnn_study/slurm", workdir=".")

Every array task runs the same worker command in `workdir` on a file system
all nodes share; the workers claim trials through the study directory
(`trial_claims`), so no trial runs twice and resubmitting the script resumes.

SLURM signals the task `SIGNAL_SECONDS` before its time limit (`--signal`):
the workers stop at the next step boundary, checkpoint, release their claims
and exit (`preemption_deadline_seconds`), so a resubmitted array resumes the
interrupted trials at once, from the step they reached.
"""

from __future__ import annotations

import os
import shlex
from typing import Sequence

# SIGTERM this long before the time limit: the trainer's deadline (60 s by
# default) plus the launcher's grace for its workers, with room to spare.
SIGNAL_SECONDS = 180
DEFAULT_CPUS_PER_TASK = 8


def job_array_script(worker_argv: Sequence[str], *, num_workers: int,
                     job_name: str, log_dir: str, workdir: str,
                     directives: Sequence[str] = (),
                     cpus_per_task: int = DEFAULT_CPUS_PER_TASK) -> str:
  """The text of an `sbatch` script running `num_workers` copies of the worker.

  SLURM opens the task logs in `log_dir` before the script runs: it must exist.

  `directives` are extra `#SBATCH` options, e.g. "--gres=gpu:1" or
  "--time=04:00:00" (with or without the leading "#SBATCH "); a
  `--signal` or `--cpus-per-task` among them replaces the script's own.
  """
  if num_workers < 1:
    raise ValueError(f"num_workers={num_workers}: must be >= 1")
  if cpus_per_task < 1:
    raise ValueError(f"cpus_per_task={cpus_per_task}: must be >= 1")
  extra = []
  for directive in directives:
    directive = directive.strip()
    if directive.startswith("#SBATCH"):
      directive = directive[len("#SBATCH"):].strip()
    if "\n" in directive:
      raise ValueError(f"SBATCH directive {directive!r} spans several lines")
    extra.append(directive)
  defaults = {"--cpus-per-task": str(cpus_per_task),
              # B: the batch shell, which is the launcher (exec); it passes
              # SIGTERM on to its workers.
              "--signal": f"B:TERM@{SIGNAL_SECONDS}"}
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={job_name}",
           f"#SBATCH --array=0-{num_workers - 1}",
           f"#SBATCH --output={os.path.join(log_dir, '%A_%a.out')}"]
  lines += [f"#SBATCH {option}={value}" for option, value in defaults.items()
            if not any(d.split("=")[0].split()[:1] == [option] for d in extra)]
  lines += [f"#SBATCH {directive}" for directive in extra]
  lines += ["",
            "# Each task is a worker: it claims unfinished trials one by one",
            "# and exits when none is left; resubmitting resumes the study.",
            "set -euo pipefail",
            f"cd {shlex.quote(workdir)}",
            "exec " + shlex.join(worker_argv),
            ""]
  return "\n".join(lines)
