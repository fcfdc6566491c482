"""SLURM job-array scripts whose tasks are study workers.

  script = slurm.job_array_script(["python", "-m", "tuning_playbook.sweep",
                                   ..., "--run", "--worker"],
                                  num_workers=8, job_name="cnn_study",
                                  log_dir="runs/cnn_study/slurm", workdir=".")

Every array task runs the same worker command in `workdir` on a file system
all nodes share; the workers claim trials through the study directory
(`trial_claims`), so no trial runs twice and resubmitting the script resumes.
"""

from __future__ import annotations

import os
import shlex
from typing import Sequence


def job_array_script(worker_argv: Sequence[str], *, num_workers: int,
                     job_name: str, log_dir: str, workdir: str,
                     directives: Sequence[str] = ()) -> str:
  """The text of an `sbatch` script running `num_workers` copies of the worker.

  SLURM opens the task logs in `log_dir` before the script runs: it must exist.

  `directives` are extra `#SBATCH` options, e.g. "--gres=gpu:1" or
  "--time=04:00:00" (with or without the leading "#SBATCH ").
  """
  if num_workers < 1:
    raise ValueError(f"num_workers={num_workers}: must be >= 1")
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={job_name}",
           f"#SBATCH --array=0-{num_workers - 1}",
           f"#SBATCH --output={os.path.join(log_dir, '%A_%a.out')}"]
  for directive in directives:
    directive = directive.strip()
    if directive.startswith("#SBATCH"):
      directive = directive[len("#SBATCH"):].strip()
    if "\n" in directive:
      raise ValueError(f"SBATCH directive {directive!r} spans several lines")
    lines.append(f"#SBATCH {directive}")
  lines += ["",
            "# Each task is a worker: it claims unfinished trials one by one",
            "# and exits when none is left; resubmitting resumes the study.",
            "set -euo pipefail",
            f"cd {shlex.quote(workdir)}",
            "exec " + shlex.join(worker_argv),
            ""]
  return "\n".join(lines)
