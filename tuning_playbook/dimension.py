"""One searched hyperparameter: its scale, bounds or values, and condition.

A dimension maps a coordinate u in [0, 1) of the search sequence to a value:

  dim = Dimension("optimizer.momentum", "optimizer.momentum", "nuisance",
                  "reverse_log", 0.5, 0.999)
  dim.value(0.0), dim.value(0.5)  # 0.5, ~0.978: 1 - momentum is log-uniform
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

NUMERIC_SCALES = ("linear", "log", "reverse_log", "int_linear", "int_log")


@dataclasses.dataclass(frozen=True)
class Dimension:
  """One searched hyperparameter: one coordinate of the sequence."""
  name: str  # Unique: "optimizer.beta1[optimizer.name=adam]" when conditional.
  param: str  # Config path, or a label when the values are dicts of overrides.
  role: str
  scale: str  # One of NUMERIC_SCALES or "categorical".
  min: float | int | None = None
  max: float | int | None = None
  values: tuple[Any, ...] | None = None
  condition: tuple[tuple[str, Any], ...] = ()  # (parent dimension, value).
  grid_points: int | None = None

  def value(self, u: float) -> Any:
    """Maps u in [0, 1] to a value of this dimension on its scale.

    The sequences give u < 1; grids also use u = 1, the top of the range.
    """
    if self.scale == "categorical":
      return self.values[min(int(u * len(self.values)), len(self.values) - 1)]
    lo, hi = self.min, self.max
    if self.scale == "linear":
      x = lo + u * (hi - lo)
    elif self.scale == "log":
      x = math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    elif self.scale == "reverse_log":
      q_lo, q_hi = math.log(1 - lo), math.log(1 - hi)
      x = 1 - math.exp(q_lo + u * (q_hi - q_lo))
    elif self.scale == "int_linear":
      return lo + min(int(u * (hi - lo + 1)), hi - lo)
    else:  # int_log: log-uniform on [lo, hi + 1), floored.
      x = math.exp(math.log(lo) + u * (math.log(hi + 1) - math.log(lo)))
      return max(lo, min(int(math.floor(x)), hi))
    if u <= 0 or u >= 1:  # Exact bounds, not exp(log(bound)).
      x = lo if u <= 0 else hi
    return float(min(max(x, lo), hi))

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
