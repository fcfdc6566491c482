"""Optimizing away nuisance hyperparameters: the best trials per scientific value.

An isolation plot shows, for each value of a scientific hyperparameter, the
best trial over all the nuisance ones. Continuous hyperparameters sampled by
(quasi-)random search are bucketed along their scale first.

  for group in isolation.groups(study, study.dimensions["optimizer.weight_decay"]):
    print(group.label, isolation.best_trials(study, group, k=1))
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Sequence

from tuning_playbook.analysis import study_data

MAX_DISTINCT_VALUES = 8
MAX_BUCKETS = 8


@dataclasses.dataclass(frozen=True)
class Group:
  """Trials sharing one value (or one bucket) of a hyperparameter."""
  dimension: str
  label: str
  x: Any  # The value, the bucket's centre on the dimension's scale, or a category.
  trials: tuple[study_data.Trial, ...]


def with_observed_bounds(dim: study_data.Dimension,
                         values: Sequence[Any]) -> study_data.Dimension:
  """The dimension with min/max filled in from the sampled values if absent."""
  if not dim.numeric or (dim.min is not None and dim.max is not None):
    return dim
  numbers = [float(v) for v in values if isinstance(v, (int, float))]
  if not numbers:
    return dim
  return dataclasses.replace(dim, min=dim.min if dim.min is not None else min(numbers),
                             max=dim.max if dim.max is not None else max(numbers))


def _key(value: Any) -> str:
  return json.dumps(value, sort_keys=True)


def _format(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.3g}"
  return str(value)


def groups(study: study_data.Study, dim: study_data.Dimension) -> list[Group]:
  """The trials grouped by their value of `dim`, in the dimension's order."""
  trials = [t for t in study.trials if dim.name in t.values]
  distinct = {}
  for trial in trials:
    distinct.setdefault(_key(trial.values[dim.name]), []).append(trial)
  # A small integer range or a few distinct values (a grid) keep one group
  # per value; values sampled from a wide range are bucketed.
  small_int_range = (dim.scale in study_data.INT_SCALES and dim.min is not None
                     and dim.max is not None
                     and dim.max - dim.min < MAX_DISTINCT_VALUES)
  if dim.numeric and not small_int_range and len(distinct) > MAX_DISTINCT_VALUES // 2:
    return _buckets(with_observed_bounds(
        dim, [t.values[dim.name] for t in trials]), trials)
  order = [_key(v) for v in dim.values or ()]
  def rank(key):
    value = json.loads(key)
    if key in order:
      return (0, order.index(key), "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return (1, float(value), "")
    return (2, 0.0, key)
  return [Group(dim.name, _format(json.loads(k)), json.loads(k), tuple(distinct[k]))
          for k in sorted(distinct, key=rank)]


def _buckets(dim: study_data.Dimension, trials: Sequence[study_data.Trial]) -> list[Group]:
  finished = [t for t in trials if t.status != study_data.UNFINISHED]
  n = min(MAX_BUCKETS, max(3, round(math.sqrt(max(len(finished), 1)))))
  members = [[] for _ in range(n)]
  for trial in trials:
    position = dim.position(trial.values[dim.name])
    if position is None:
      continue
    members[min(n - 1, max(0, int(position * n)))].append(trial)
  out = []
  for i, bucket in enumerate(members):
    lo, hi = dim.value_at(i / n), dim.value_at((i + 1) / n)
    out.append(Group(dim.name, f"[{lo:.3g}, {hi:.3g}{']' if i == n - 1 else ')'}",
                     dim.value_at((i + 0.5) / n), tuple(bucket)))
  return out


def best_trials(study: study_data.Study, group: Group,
                k: int) -> list[study_data.Trial]:
  """The best `k` feasible trials of a group, best first."""
  ids = {t.trial_id for t in group.trials}
  return [t for t in study.feasible_trials() if t.trial_id in ids][:k]


def curve_groups(study: study_data.Study,
                 k: int) -> list[tuple[str, list[study_data.Trial]]]:
  """(title, best few trials) per scientific value, or overall if none."""
  out = []
  for dim in study.scientific_dimensions():
    for group in groups(study, dim):
      best = best_trials(study, group, k)
      if best:
        out.append((f"{dim.name} = {group.label}", best))
  if not out:
    best = study.feasible_trials()[:k]
    if best:
      out.append(("best trials of the study", best))
  return out


def gradient_trials(study: study_data.Study, k: int,
                    limit: int = 8) -> list[study_data.Trial]:
  """The best `k` trials and the best trial of each scientific value."""
  chosen = list(study.feasible_trials()[:k])
  for _, trials in curve_groups(study, 1):
    if trials[0] not in chosen:
      chosen.append(trials[0])
  return chosen[:limit]
