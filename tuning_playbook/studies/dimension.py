"""One searched hyperparameter: its scale, bounds or values, and condition.

Every fact about a scale lives here: which bounds it accepts, how the sampler
maps a coordinate u in [0, 1) of the search sequence to a value (`value`), and
where a value lies between the bounds (`position`, read by the analysis):

  dim = Dimension("optimizer.momentum", "reverse_log", 0.5, 0.999)
  dim.value(0.0), dim.value(0.5)  # 0.5, ~0.978: 1 - momentum is log-uniform
  dim.position(dim.value(0.5))    # ~0.5
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

NUMERIC_SCALES = ("linear", "log", "reverse_log", "int_linear", "int_log")
INT_SCALES = ("int_linear", "int_log")
LOG_SCALES = ("log", "int_log")


def check_bounds(scale: str, lo: Any, hi: Any) -> tuple[Any, Any]:
  """`(min, max)` of a numeric scale as the sampler uses them.

  Raises ValueError saying which bound does not suit the scale.
  """
  for bound, x in (("min", lo), ("max", hi)):
    if (isinstance(x, bool) or not isinstance(x, (int, float))
        or not math.isfinite(x)):
      raise ValueError(f"{bound}={x!r} must be a finite number")
  if not lo < hi:
    raise ValueError(f"min={lo!r} must be < max={hi!r} (list a single value "
                     "under 'fixed' instead)")
  if scale in INT_SCALES:
    if not (float(lo).is_integer() and float(hi).is_integer()):
      raise ValueError(f"scale {scale!r} needs integer bounds")
    lo, hi = int(lo), int(hi)
  if scale == "log" and lo <= 0:
    raise ValueError(f"scale 'log' needs min > 0, got {lo!r}")
  if scale == "int_log" and lo < 1:
    raise ValueError(f"scale 'int_log' needs min >= 1, got {lo!r}")
  if scale == "reverse_log" and hi >= 1:
    raise ValueError("scale 'reverse_log' samples 1 - x log-uniformly and "
                     f"needs max < 1, got {hi!r}")
  if scale == "linear":
    lo, hi = float(lo), float(hi)
  return lo, hi


def _warp(scale: str, x: float) -> float:
  """The coordinate in which `scale` is uniform."""
  if scale in LOG_SCALES:
    return math.log(x)
  if scale == "reverse_log":
    return math.log(1 - x)
  return float(x)


def _interpolate(scale: str, lo: float, hi: float, p: float) -> float:
  """The value a fraction `p` of the way from lo to hi on `scale`."""
  a, b = _warp(scale, lo), _warp(scale, hi)
  y = a + p * (b - a)
  if scale in LOG_SCALES:
    return math.exp(y)
  if scale == "reverse_log":
    return 1 - math.exp(y)
  return y


@dataclasses.dataclass(frozen=True)
class Dimension:
  """One searched hyperparameter: one coordinate of the sequence."""
  name: str  # Unique: "optimizer.beta1[optimizer.name=adam]" when conditional.
  scale: str  # One of NUMERIC_SCALES or "categorical".
  min: float | int | None = None
  max: float | int | None = None
  values: tuple[Any, ...] | None = None
  role: str = "nuisance"
  # Config path ("" means the name), or a label when the values are dicts of
  # overrides.
  param: str = ""
  condition: tuple[tuple[str, Any], ...] = ()  # (parent dimension, value).
  grid_points: int | None = None

  def __post_init__(self):
    if not self.param:
      object.__setattr__(self, "param", self.name)

  @property
  def numeric(self) -> bool:
    return self.scale in NUMERIC_SCALES

  def value(self, u: float) -> Any:
    """Maps u in [0, 1] to a value of this dimension on its scale.

    The sequences give u < 1; grids also use u = 1, the top of the range.
    Integer scales draw on [min, max + 1) and round down, so every integer
    in the bounds gets its share.
    """
    if self.scale == "categorical":
      return self.values[min(int(u * len(self.values)), len(self.values) - 1)]
    lo, hi = self.min, self.max
    if self.scale == "int_linear":
      return lo + min(int(u * (hi - lo + 1)), hi - lo)
    if self.scale == "int_log":
      x = _interpolate(self.scale, lo, hi + 1, u)
      return max(lo, min(int(math.floor(x)), hi))
    if u <= 0 or u >= 1:  # Exact bounds, not exp(log(bound)).
      return float(lo if u <= 0 else hi)
    return float(min(max(_interpolate(self.scale, lo, hi, u), lo), hi))

  def position(self, value: Any) -> float | None:
    """Where `value` lies from min (0) to max (1) along the scale.

    None for a categorical, a missing bound, or a value off the scale.
    """
    if not self.numeric or value is None or self.min is None or self.max is None:
      return None
    try:
      v, lo, hi = (_warp(self.scale, float(x))
                   for x in (value, self.min, self.max))
    except (TypeError, ValueError):
      return None
    if hi == lo:
      return 0.5
    return (v - lo) / (hi - lo)

  def value_at(self, position: float) -> float:
    """The inverse of `position` (a float, not rounded for integer scales)."""
    return _interpolate(self.scale, float(self.min), float(self.max), position)

  def config_keys(self) -> list[str]:
    """The config paths this dimension sets."""
    if self.scale == "categorical" and isinstance(self.values[0], Mapping):
      return list(dict.fromkeys(k for v in self.values for k in v))
    return [self.param]

  def overrides(self, value: Any) -> dict[str, Any]:
    """The config overrides that `value` of this dimension stands for."""
    return dict(value) if isinstance(value, Mapping) else {self.param: value}

  def to_json(self) -> dict[str, Any]:
    out = {"role": self.role}
    if self.scale == "categorical":
      out["values"] = list(self.values)
    else:
      out.update(scale=self.scale, min=self.min, max=self.max)
    if self.grid_points is not None:
      out["grid_points"] = self.grid_points
    if self.condition or self.param != self.name:
      out["param"] = self.param
    if self.condition:
      out["condition"] = {parent: value for parent, value in self.condition}
    return out

  @classmethod
  def from_json(cls, name: str, record: Any) -> Dimension:
    """The dimension `to_json` wrote as `record`; missing fields get defaults."""
    record = record if isinstance(record, Mapping) else {}
    values = record.get("values")
    condition = record.get("condition")
    return cls(
        name=name,
        scale=str(record.get("scale", "categorical" if values else "linear")),
        min=record.get("min"), max=record.get("max"),
        values=tuple(values) if isinstance(values, list) else None,
        role=str(record.get("role", "nuisance")),
        param=str(record.get("param") or name),
        condition=(tuple(condition.items())
                   if isinstance(condition, Mapping) else ()),
        grid_points=record.get("grid_points"))


def grid_axis(dim: Dimension) -> list[float]:
  """Unit coordinates of a grid axis: one per value, or evenly spaced."""
  if dim.scale == "categorical":
    k = len(dim.values)
    return [(j + 0.5) / k for j in range(k)]
  return [j / (dim.grid_points - 1) for j in range(dim.grid_points)]


def dimension_name(param: str, condition: tuple[tuple[str, Any], ...]) -> str:
  """`param`, or `param[parent=value,...]` naming the conditions it needs."""
  if not condition:
    return param
  label = ",".join(f"{parent.split('[')[0]}={value}"
                   for parent, value in condition)
  return f"{param}[{label}]"
