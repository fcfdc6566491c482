"""A nested config as one flat dict keyed by dotted path.

  config_paths.flatten({"optimizer": {"name": "adam", "b1": 0.9}, "seed": 0})
  # {"optimizer.name": "adam", "optimizer.b1": 0.9, "seed": 0}

The same paths name config fields on the command line (`--config.optimizer.b1`),
in a search space and in a study's recorded base config.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections


def flatten(tree: Mapping[str, Any] | ml_collections.ConfigDict,
            prefix: str = "") -> dict[str, Any]:
  """Every leaf of `tree` by dotted path; keys that hold dots are kept as they are."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, (Mapping, ml_collections.ConfigDict)):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out
