"""Search spaces: what a study varies, on which scale, and in what role.

A config file defines its study with `get_search_space(config, num_trials)`:
the config as resolved (ranges may follow it: warmup as a fraction of
`config.max_train_steps`) and the trial budget (None for a grid's natural
size; study_presets.adam_nuisance follows it). Either argument may be left
out. It returns a dict (or ConfigDict) like:

  {
      "name": "nesterov_vs_adam",
      "description": "Which optimizer reaches the lower validation error?",
      "algorithm": "quasi_random",        # | "pseudo_random" | "grid"
      "scientific_mode": "separate",      # one study per value | "joint"
      "scientific": {"optimizer.name": {
          "values": ["nesterov", "adam"],
          "conditional": {
              "nesterov": {"optimizer.learning_rate": {
                              "scale": "log", "min": 1e-3, "max": 1.0},
                           "optimizer.momentum": {
                              "scale": "reverse_log",
                              "min": 0.5, "max": 0.999}},
              "adam": {"optimizer.learning_rate": {
                          "scale": "log", "min": 1e-5, "max": 1e-2},
                       "optimizer.beta1": {
                          "scale": "reverse_log", "min": 0.5, "max": 0.99}}}}},
      "nuisance": {"optimizer.weight_decay": {
          "scale": "log", "min": 1e-6, "max": 1e-2}},
      "fixed": {"optimizer.schedule": "cosine"},
  }

Keys are dotted config paths (nested sections work too). Scales: `linear`,
`log`, `reverse_log` (log-uniform 1 - x, for momentum-like values near 1),
`int_linear`, `int_log` (integers, bounds inclusive), or `values` for a
categorical. A categorical whose values are dicts sets several keys at once.
`conditional` maps a categorical value to parameters that exist only for it;
each is its own dimension, so a same-named parameter under two values is two
distinct hyperparameters. The scale math lives in tuning_playbook/studies/dimension.py.

`max_train_steps` is never tuned (the playbook: "Never tune the
`max_train_steps` number in a study"): only a scientific categorical, such as
study_presets.warmup_study's schedules, may set it.

Scientific parameters get one study per value (`scientific_mode="separate"`,
in `<study_dir>/<param>=<value>/`, all with the same seed so trial i sits at
the same place of every study's nuisance space) or are searched together with
the nuisance ones ("joint"), placed first, where the sequence covers their
values most evenly. Dimensions follow the order written (a ConfigDict sorts
its keys); trial i depends only on (seed, i, search space).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Mapping, Sequence

import numpy as np

from tuning_playbook import config_paths
from tuning_playbook.studies import dimension as dimension_lib
from tuning_playbook.studies import halton

Dimension = dimension_lib.Dimension
NUMERIC_SCALES = dimension_lib.NUMERIC_SCALES
ALGORITHMS = ("quasi_random", "pseudo_random", "grid")
SCIENTIFIC_MODES = ("separate", "joint")
ROLES = ("scientific", "nuisance")
_TOP_LEVEL_KEYS = ("name", "description", "algorithm", "scientific_mode",
                   "scientific", "nuisance", "fixed")
_PARAM_KEYS = ("scale", "min", "max", "values", "conditional", "grid_points")
MAX_GRID_DIMS = 2
# Point i of the study is point i + SKIP of the scrambled Halton sequence.
# The scramble permutes every digit, trailing zeros included, so point 0 is
# an ordinary random point; with no skip, the first b**k trials are exactly
# stratified in each coordinate of base b.
SKIP = 0
SAMPLER_VERSION = 1
TRAINING_LENGTH_KEY = "max_train_steps"
# The playbook, "Deciding how long to train when training is not
# compute-bound".
TRAINING_LENGTH_RULE = ("Never tune the `max_train_steps` number in a study. "
                        "Pick a value and use it for all trials.")


class SearchSpaceError(ValueError):
  """A search space that cannot define a study; the message names the key."""


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """A parsed search space; `sample` turns trial indices into params.

    space = search_space.parse({"nuisance": {
        "optimizer.learning_rate": {"scale": "log", "min": 1e-3, "max": 1}}})
    space.sample(range(4), seed=0)  # [{"optimizer.learning_rate": ...}, ...]
  """
  dimensions: tuple[Dimension, ...]
  fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # Scientific values held constant by this study (one study per value).
  scientific: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  algorithm: str = "quasi_random"
  scientific_mode: str = "separate"
  name: str = ""
  description: str = ""

  def to_json(self) -> dict[str, Any]:
    return {d.name: d.to_json() for d in self.dimensions}

  def config_keys(self) -> list[str]:
    """Every config path a trial of this space may set."""
    keys = list(self.fixed) + list(self.scientific)
    for dim in self.dimensions:
      keys.extend(dim.config_keys())
    return list(dict.fromkeys(keys))

  def grid_size(self) -> int:
    return math.prod(len(dimension_lib.grid_axis(d)) for d in self.dimensions)

  def sample(self, indices: Sequence[int], seed: int) -> list[dict[str, Any]]:
    """Params of trials `indices`; trial i depends only on (seed, i, space)."""
    indices, n = list(indices), len(self.dimensions)
    if self.algorithm == "quasi_random":
      units = halton.scrambled_halton([i + SKIP for i in indices], n, seed)
    elif self.algorithm == "pseudo_random":
      units = halton.pseudo_random(indices, n, seed)
    else:
      units = self._grid_units(indices)
    return self.params_at(units)

  def params_at(self, units: Sequence[Sequence[float]]) -> list[dict[str, Any]]:
    """Params of points of the unit cube (Dimension.value of each coordinate)."""
    trials = []
    for row in units:
      chosen, params = {}, dict(self.scientific)
      for dim, u in zip(self.dimensions, row):
        if all(chosen.get(p, _INACTIVE) == v for p, v in dim.condition):
          chosen[dim.name] = dim.value(float(u))
          params.update(dim.overrides(chosen[dim.name]))
      trials.append(params)
    return trials

  def _grid_units(self, indices: Sequence[int]) -> np.ndarray:
    axes = [dimension_lib.grid_axis(d) for d in self.dimensions]
    size = math.prod(len(a) for a in axes)
    out = np.zeros((len(indices), len(axes)))
    for row, index in enumerate(indices):
      if index >= size:
        raise SearchSpaceError(
            f"the grid has {size} points; trial {index} does not exist "
            "(ask for at most that many trials)")
      for col in reversed(range(len(axes))):
        index, position = divmod(index, len(axes[col]))
        out[row, col] = axes[col][position]
    return out


_INACTIVE = object()


def _is_param_spec(value: Any) -> bool:
  return isinstance(value, Mapping) and ("scale" in value or "values" in value)


def _flatten(mapping: Mapping[str, Any], what: str, prefix: str = "",
             leaf=_is_param_spec) -> dict[str, Any]:
  """Dotted paths to leaves, accepting nested sections and dotted keys."""
  out = {}
  for key, value in mapping.items():
    path = f"{prefix}{key}"
    if not isinstance(key, str) or not key:
      raise SearchSpaceError(f"{what}: key {key!r} is not a config path")
    if leaf(value):
      out[path] = value
    elif isinstance(value, Mapping):
      out.update(_flatten(value, what, f"{path}.", leaf))
    else:
      raise SearchSpaceError(
          f"{what}.{path}: expected a parameter with 'scale' or 'values', "
          f"got {value!r}")
  return out


def _to_plain(value: Any) -> Any:
  if hasattr(value, "to_dict"):
    return value.to_dict()
  return value


def _numeric_bounds(path: str, scale: str, spec: Mapping[str, Any]):
  if "min" not in spec or "max" not in spec:
    raise SearchSpaceError(f"{path}: scale {scale!r} needs 'min' and 'max'")
  try:
    return dimension_lib.check_bounds(scale, spec["min"], spec["max"])
  except ValueError as e:
    raise SearchSpaceError(f"{path}: {e}") from e


def _parse_param(path: str, spec: Mapping[str, Any], role: str,
                 condition: tuple[tuple[str, Any], ...]) -> list[Dimension]:
  """One parameter and, depth first, its conditional children."""
  unknown = sorted(set(spec) - set(_PARAM_KEYS))
  if unknown:
    raise SearchSpaceError(
        f"{path}: unknown field(s) {', '.join(unknown)}; allowed: "
        f"{', '.join(_PARAM_KEYS)}")
  name = dimension_lib.dimension_name(path, condition)
  grid_points = spec.get("grid_points")
  if grid_points is not None and (not isinstance(grid_points, int)
                                  or grid_points < 2):
    raise SearchSpaceError(f"{path}.grid_points={grid_points!r}: must be >= 2")
  if "values" in spec:
    values = tuple(_to_plain(v) for v in spec["values"])
    if spec.get("scale", "categorical") != "categorical" or not values:
      raise SearchSpaceError(
          f"{path}: 'values' needs a non-empty list and no numeric scale")
    if len(set(map(repr, values))) != len(values):
      raise SearchSpaceError(f"{path}: repeated values in {list(values)}")
    if any(isinstance(v, Mapping) for v in values):
      if not all(isinstance(v, Mapping) and v for v in values):
        raise SearchSpaceError(
            f"{path}: values must be all dicts of overrides or all plain")
      values = tuple(config_paths.flatten(v) for v in values)
    dim = Dimension(name, "categorical", values=values, role=role,
                    param=path, condition=condition, grid_points=grid_points)
  else:
    scale = spec["scale"]
    if scale not in NUMERIC_SCALES:
      raise SearchSpaceError(
          f"{path}.scale={scale!r}: allowed: {', '.join(NUMERIC_SCALES)} "
          "(or 'values' for a categorical)")
    lo, hi = _numeric_bounds(path, scale, spec)
    dim = Dimension(name, scale, lo, hi, role=role, param=path,
                    condition=condition, grid_points=grid_points)
  dims = [dim]
  conditional = _to_plain(spec.get("conditional") or {})
  if conditional and dim.scale != "categorical":
    raise SearchSpaceError(f"{path}: only a categorical can have 'conditional'")
  for value, children in conditional.items():
    if value not in dim.values:
      raise SearchSpaceError(
          f"{path}.conditional: {value!r} is not one of {list(dim.values)}")
    for child, child_spec in _flatten(children, f"{path}.conditional").items():
      dims.extend(_parse_param(child, child_spec, "nuisance",
                               condition + ((dim.name, value),)))
  return dims


def _check_conflicts(space: SearchSpace) -> None:
  """Two dimensions may set one config path only under exclusive conditions."""
  for a, b in itertools.combinations(space.dimensions, 2):
    if not set(a.config_keys()) & set(b.config_keys()):
      continue
    cond_a, cond_b = dict(a.condition), dict(b.condition)
    if not any(p in cond_b and cond_b[p] != v for p, v in cond_a.items()):
      raise SearchSpaceError(
          f"{', '.join(sorted(set(a.config_keys()) & set(b.config_keys())))} "
          f"is searched twice ({a.name} and {b.name}) in trials where both "
          "are active")
  searched = {k for d in space.dimensions for k in d.config_keys()}
  for key in set(space.fixed) & searched:
    raise SearchSpaceError(f"{key} is both fixed and searched")


def _check_training_length(space: SearchSpace) -> None:
  """Only a scientific categorical (a schedule studied as such) may vary the
  training length; a tuned one would be refused by the playbook."""
  for dim in space.dimensions:
    if (TRAINING_LENGTH_KEY in dim.config_keys()
        and not (dim.role == "scientific" and dim.scale == "categorical")):
      where = (dim.name if dim.name == TRAINING_LENGTH_KEY
               else f"{dim.name} (sets {TRAINING_LENGTH_KEY})")
      raise SearchSpaceError(
          f"{dim.role}.{where}: {TRAINING_LENGTH_KEY} cannot be searched. The "
          "playbook (\"Deciding how long to train when training is not "
          f"compute-bound\"): \"{TRAINING_LENGTH_RULE}\" Set it with "
          f"--config.{TRAINING_LENGTH_KEY}=N or under 'fixed' and refine it "
          "from the best step that retrospective checkpoint selection finds "
          "(python -m tuning_playbook.analyze), or compare listed lengths as "
          "a scientific hyperparameter with 'values'.")


def parse(spec: Mapping[str, Any]) -> SearchSpace:
  """Checks a `get_search_space(...)` result and returns its SearchSpace."""
  spec = _to_plain(spec)
  if not isinstance(spec, Mapping):
    raise SearchSpaceError(
        f"a search space is a dict, got {type(spec).__name__}")
  unknown = sorted(set(spec) - set(_TOP_LEVEL_KEYS))
  if unknown:
    raise SearchSpaceError(
        f"unknown search space key(s) {', '.join(unknown)}; allowed: "
        f"{', '.join(_TOP_LEVEL_KEYS)}")
  algorithm = spec.get("algorithm", "quasi_random")
  if algorithm not in ALGORITHMS:
    raise SearchSpaceError(
        f"algorithm={algorithm!r}: allowed: {', '.join(ALGORITHMS)}")
  mode = spec.get("scientific_mode", "separate")
  if mode not in SCIENTIFIC_MODES:
    raise SearchSpaceError(
        f"scientific_mode={mode!r}: allowed: {', '.join(SCIENTIFIC_MODES)}")
  scientific = _flatten(_to_plain(spec.get("scientific") or {}), "scientific")
  nuisance = _flatten(_to_plain(spec.get("nuisance") or {}), "nuisance")
  fixed = config_paths.flatten(_to_plain(spec.get("fixed") or {}))
  for key in set(scientific) & set(nuisance):
    raise SearchSpaceError(f"{key} is both scientific and nuisance")
  dims = []
  for role, params in (("scientific", scientific), ("nuisance", nuisance)):
    for path, param_spec in params.items():
      dims.extend(_parse_param(path, param_spec, role, ()))
  space = SearchSpace(tuple(dims), fixed, {}, algorithm, mode,
                      str(spec.get("name", "")),
                      str(spec.get("description", "")))
  _check_conflicts(space)
  _check_training_length(space)
  if len({d.name for d in dims}) != len(dims):
    raise SearchSpaceError("a parameter is defined twice under one condition")
  if mode == "separate":
    for dim in dims:
      if dim.role == "scientific" and dim.scale != "categorical":
        raise SearchSpaceError(
            f"{dim.name}: one study per scientific value needs 'values'; "
            "use scientific_mode='joint' to search a range")
  if algorithm == "grid":
    for _, study_space in split_scientific(space):
      _check_grid(study_space)
  return space


def _check_grid(space: SearchSpace) -> None:
  if len(space.dimensions) > MAX_GRID_DIMS:
    raise SearchSpaceError(
        f"grid search over {len(space.dimensions)} dimensions: grids are "
        f"only efficient in 1-{MAX_GRID_DIMS} dimensions (Bergstra & Bengio "
        "2012); use algorithm='quasi_random'")
  for dim in space.dimensions:
    if dim.condition:
      raise SearchSpaceError(f"{dim.name}: grid search has no conditionals")
    if dim.scale != "categorical" and dim.grid_points is None:
      raise SearchSpaceError(f"{dim.name}: grid search needs 'grid_points'")


def split_scientific(space: SearchSpace) -> list[tuple[str, SearchSpace]]:
  """One (slug, space) per study: per scientific value, or the whole space.

  In "separate" mode each combination of scientific values becomes its own
  study whose nuisance dimensions are the general ones plus the conditional
  children of the chosen values. In "joint" mode the space is one study whose
  scientific dimensions come first, where the sequence is most even.
  """
  top = [d for d in space.dimensions if d.role == "scientific"]
  if space.scientific_mode == "joint" or not top:
    order = sorted(space.dimensions, key=lambda d: d.role != "scientific")
    return [("", dataclasses.replace(space, dimensions=tuple(order)))]
  studies = []
  for combo in itertools.product(*(d.values for d in top)):
    chosen = {d.name: v for d, v in zip(top, combo)}
    renamed, dims = {}, []
    for dim in space.dimensions:  # Parents come before their children.
      if dim.role == "scientific" or any(
          p in chosen and chosen[p] != v for p, v in dim.condition):
        continue
      kept = tuple((renamed[p], v) for p, v in dim.condition if p not in chosen)
      renamed[dim.name] = dimension_lib.dimension_name(dim.param, kept)
      dims.append(dataclasses.replace(dim, name=renamed[dim.name],
                                      condition=kept))
    scientific = {}
    for dim, value in zip(top, combo):
      scientific.update(dim.overrides(value))
    slug = ",".join(f"{d.param}={_slug_value(v)}" for d, v in zip(top, combo))
    studies.append((slug, dataclasses.replace(
        space, dimensions=tuple(dims), scientific=scientific,
        name=f"{space.name}/{slug}" if space.name else slug)))
  return studies


def _slug_value(value: Any) -> str:
  text = (",".join(f"{k}={v}" for k, v in value.items())
          if isinstance(value, Mapping) else str(value))
  return "".join(c if c.isalnum() or c in "._-=," else "_" for c in text)


BATCH_SIZE_KEY = "batch_size"
# The playbook, "Choosing the batch size": not a hyperparameter to tune.
BATCH_SIZE_REASON = (
    "the batch size is not a hyperparameter to tune for validation "
    "performance: choose it for training speed (`playbook batch_size`), and "
    "re-tune the learning rate and regularization whenever it changes")


def batch_size_warning(search_space: Mapping[str, Mapping[str, Any]]) -> str | None:
  """The playbook's reason when study.json's `search_space` tunes the batch
  size as a nuisance hyperparameter."""
  tuned = [name for name, spec in search_space.items()
           if spec.get("role", "nuisance") == "nuisance"
           and BATCH_SIZE_KEY in (name, spec.get("param"))]
  return (f"{tuned[0]} is searched as a nuisance hyperparameter, but "
          f"{BATCH_SIZE_REASON}") if tuned else None

