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
import json
import os
from typing import Any, Mapping, Sequence

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


def same(a: Any, b: Any) -> bool:
  """Whether two override values are equal as JSON records them."""
  return json.dumps(a, default=str) == json.dumps(b, default=str)


def best_references(source: Source, top_k: int | None) -> list[Reference]:
  """The best `top_k` trials; ProcedureError naming --top_k when the study
  has fewer, or `top_k` is not positive."""
  if top_k is None or top_k < 1:
    raise ProcedureError(f"--top_k={top_k}: must be >= 1")
  references = source.top(top_k)
  if len(references) < top_k:
    raise ProcedureError(
        f"--top_k={top_k}: --from_study={source.study_dir} has only "
        f"{len(references)} completed trial(s)")
  return references


def split_common(overrides: Sequence[Mapping[str, Any]]
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """(the overrides every one of `overrides` shares, each one's own rest):
  the fixed values and the per-trial grid of a procedure that reruns
  several trials. ProcedureError when two of them are the same."""
  common = {k: v for k, v in overrides[0].items()
            if all(k in o and same(o[k], v) for o in overrides)}
  own = [{k: v for k, v in o.items() if k not in common} for o in overrides]
  if len(own) > 1 and (any(not o for o in own) or len(
      {json.dumps(o, sort_keys=True, default=str) for o in own}) < len(own)):
    raise ProcedureError(
        f"--top_k={len(own)}: some of the best trials differ in nothing this "
        "procedure keeps (only in their seed, say); take fewer (--top_k=1)")
  return common, own


def find_study_dir(parameters: Mapping[str, Any]) -> str | None:
  """The source study's directory recorded by a procedure, if it still exists."""
  record = parameters.get("from_study") or {}
  for key in ("study_dir", "abs_study_dir"):
    path = record.get(key)
    if path and os.path.isdir(path):
      return path
  return None
