"""One trial with its failure policy: bad input vs. a failed run.

Bad input (an invalid config, unknown workload, a work directory holding
another config, or records it cannot read) raises before anything is compiled
or written. Any other
error marks the trial "failed" in summary.json (the sweep records it as
infeasible) and exits non-zero.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

from absl import logging
import jax
import ml_collections

from tuning_playbook.common import records
from tuning_playbook.common import json_records
from tuning_playbook import config_schema
from tuning_playbook.training import train
from tuning_playbook.training import trial_setup
from tuning_playbook import workload as workload_lib

BAD_INPUT_ERRORS = (config_schema.ConfigError, workload_lib.UnknownWorkloadError,
                    workload_lib.ModelConfigError, records.ConfigMismatchError,
                    json_records.RecordFileError, train.ResumeError)


def run_trial(config: ml_collections.ConfigDict, workdir: str,
              cache: trial_setup.SetupCache | None = None) -> dict[str, Any]:
  """Runs `train.train_and_evaluate`, recording an unexpected error as failed."""
  try:
    return train.train_and_evaluate(config, workdir, cache)
  except BAD_INPUT_ERRORS:
    raise
  except Exception as e:  # pylint: disable=broad-except
    logging.exception("Trial failed.")
    if jax.process_index() == 0 and os.path.isdir(workdir):
      records.write_summary(workdir, failed_summary(config, e))
    raise


def failed_summary(config: ml_collections.ConfigDict,
                   error: Exception) -> dict[str, Any]:
  """summary.json of a trial that failed with `error` (call while handling it)."""
  failed = records.summary(config, records.FAILED,
                           f"{type(error).__name__}: {error}",
                           total_train_steps=config_schema.total_train_steps(config))
  failed["traceback"] = traceback.format_exc()
  return failed
