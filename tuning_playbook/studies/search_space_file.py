"""The search space a config file defines, for the config as resolved.

  spec = search_space_file.load("configs/mnist1d_cnn.py", config, num_trials=16)
  space = search_space.parse(spec)

`config` is the config with every `--config.*` override applied, so ranges
derived from it (warmup up to 10% of `max_train_steps`) follow the overrides;
`num_trials` is the trial budget (None: a grid's natural size).
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import os
from typing import Any, Callable, Mapping

import ml_collections

from tuning_playbook.studies import search_space as search_space_lib


def _arguments(fn: Callable[..., Any], config: ml_collections.ConfigDict,
               num_trials: int | None) -> tuple[Any, ...]:
  """What `fn` accepts of (config, num_trials): both, one, or none."""
  params = inspect.signature(fn).parameters.values()
  if any(p.kind == p.VAR_POSITIONAL for p in params):
    return (config, num_trials)
  positional = [p.name for p in params
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  if positional == ["num_trials"]:
    return (num_trials,)
  return (config, num_trials)[:len(positional)]


def load(config_path: str, config: ml_collections.ConfigDict,
         num_trials: int | None) -> Mapping[str, Any]:
  """Calls `get_search_space` of the config file (`path[:arg]`).

  `get_search_space(config, num_trials)` gets both, `get_search_space(config)`
  the config, `get_search_space(num_trials)` the budget, and
  `get_search_space()` neither. It gets a copy of `config`, so it cannot
  change the config the trials start from.
  """
  path = config_path.split(":", 1)[0]
  module_spec = importlib.util.spec_from_file_location(
      "_study_config_" + os.path.splitext(os.path.basename(path))[0], path)
  if module_spec is None:
    raise search_space_lib.SearchSpaceError(f"cannot load config file {path}")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_search_space"):
    raise search_space_lib.SearchSpaceError(
        f"{path} defines no get_search_space(config, num_trials); see "
        "tuning_playbook/studies/search_space.py for what it returns")
  fn = module.get_search_space
  return fn(*_arguments(fn, copy.deepcopy(config), num_trials))
