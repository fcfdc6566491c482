"""The best trials of a finished study, as config overrides to start from.

  source = from_study.Source.load("runs/cnn_study")
  best = source.top(1)[0]
  best.trial_id, best.best_value, best.overrides
  # ("0003", 0.052, {"optimizer.learning_rate": 0.21, ...})

Trials are ranked as the analysis ranks them (study_data: the objective of
the trials' summaries, feasible trials only). `overrides` are the trial's
resolved config overrides: the study's own `--config.*` flags, its fixed
values and the trial's searched ones.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from tuning_playbook.analysis import study_data
from tuning_playbook.procedures import ProcedureError
from tuning_playbook.studies import study as study_lib


@dataclasses.dataclass(frozen=True)
class Reference:
  """One finished trial of the source study."""
  trial_id: str
  best_value: float
  overrides: Mapping[str, Any]

  def to_json(self) -> dict[str, Any]:
    return {"trial_id": self.trial_id, "best_value": self.best_value,
            "overrides": dict(self.overrides)}


def _overrides(trial: study_data.Trial) -> dict[str, Any]:
  """The trial's overrides, from the study.json of the study that holds it."""
  trial_study_dir = os.path.dirname(os.path.dirname(trial.run_dir))
  own = study_lib.load_study(trial_study_dir)
  local_id = os.path.basename(trial.run_dir)
  return own.overrides(study_lib.Trial(local_id, trial.params))


@dataclasses.dataclass(frozen=True)
class Source:
  """A finished study that a procedure starts from."""
  study_dir: str
  study: study_data.Study

  @classmethod
  def load(cls, study_dir: str) -> "Source":
    """Reads `study_dir`; ProcedureError naming --from_study if unusable."""
    path = os.path.join(study_dir, study_lib.STUDY_FILE)
    if not os.path.isdir(study_dir):
      raise ProcedureError(f"--from_study={study_dir}: no such directory")
    try:
      study = study_data.load_study(study_dir)
    except study_data.StudyError as e:
      raise ProcedureError(f"--from_study={study_dir}: {path}: {e}") from e
    if study.best_trial() is None:
      raise ProcedureError(
          f"--from_study={study_dir}: no completed trial with a finite "
          f"{study.objective.metric} (run the study first: its results.csv "
          "lists the trials' statuses)")
    return cls(study_dir, study)

  @property
  def metric(self) -> str:
    return self.study.objective.metric

  @property
  def mode(self) -> str:
    return self.study.objective.mode

  def top(self, k: int) -> list[Reference]:
    """The best `k` feasible trials (fewer if the study has fewer)."""
    return [Reference(t.trial_id, t.best_value, _overrides(t))
            for t in self.study.feasible_trials()[:k]]

  def to_json(self) -> dict[str, Any]:
    return {"study_dir": self.study_dir,
            "abs_study_dir": os.path.abspath(self.study_dir),
            "metric": self.metric, "mode": self.mode}


def find_study_dir(parameters: Mapping[str, Any]) -> str | None:
  """The source study's directory recorded by a procedure, if it still exists."""
  record = parameters.get("from_study") or {}
  for key in ("study_dir", "abs_study_dir"):
    path = record.get(key)
    if path and os.path.isdir(path):
      return path
  return None
