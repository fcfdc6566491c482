"""Search spaces the playbook recommends, for config files to return.

  # configs/my_config.py: the sweep passes the config with every --config.*
  # override applied, and --num_trials.
  from tuning_playbook import study_presets

  def get_search_space(config, num_trials):
    return study_presets.default_search_space(config, num_trials)

  # The same, and called without a config it uses get_config():
  get_search_space = study_presets.default_get_search_space(get_config)

  # Adam's hyperparameters by trial budget ("How should Adam's
  # hyperparameters be tuned?"):
  study_presets.adam_nuisance(num_trials=20)
  # -> learning rate and beta1

  # "How to apply learning rate warmup": warmup_steps over orders of
  # magnitude at 10x the unstable learning rate, post-warmup 2x warmup.
  study_presets.warmup_study(unstable_base_learning_rate=0.5,
                             max_train_steps=100_000)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import ml_collections

Range = tuple[float, float]


def _log(lo: float, hi: float) -> dict[str, Any]:
  return {"scale": "log", "min": lo, "max": hi}


def _reverse_log(lo: float, hi: float) -> dict[str, Any]:
  return {"scale": "reverse_log", "min": lo, "max": hi}


def adam_nuisance(num_trials: int, *, learning_rate: Range = (1e-5, 1e-1),
                  beta1: Range = (0.5, 0.995), epsilon: Range = (1e-10, 1e-3),
                  beta2: Range = (0.9, 0.9999),
                  beta2_min_trials: int = 50) -> dict[str, Any]:
  """Adam nuisance hyperparameters worth tuning with `num_trials` trials.

  < 10 trials: learning rate only; 10-24: + beta1; 25 or more: + epsilon;
  `beta2_min_trials` or more ("substantially more than 25"): + beta2.
  """
  if num_trials < 1:
    raise ValueError(f"num_trials={num_trials}: must be >= 1")
  space = {"optimizer.learning_rate": _log(*learning_rate)}
  if num_trials >= 10:
    space["optimizer.beta1"] = _reverse_log(*beta1)
  if num_trials >= 25:
    space["optimizer.epsilon"] = _log(*epsilon)
  if num_trials >= beta2_min_trials:
    space["optimizer.beta2"] = _reverse_log(*beta2)
  return space


def momentum_nuisance(*, learning_rate: Range = (1e-3, 1.0),
                      momentum: Range = (0.5, 0.99)) -> dict[str, Any]:
  """Learning rate (log) and momentum (1 - momentum on a log scale)."""
  return {"optimizer.learning_rate": _log(*learning_rate),
          "optimizer.momentum": _reverse_log(*momentum)}


# The longest warmup worth searching, as a fraction of training (the
# playbook's warmup guidance); the analysis never suggests going past it.
MAX_WARMUP_FRACTION = 0.1


def warmup_nuisance(max_train_steps: int,
                    max_fraction: float = MAX_WARMUP_FRACTION) -> dict[str, Any]:
  """Warmup steps from 0 to `max_fraction` of training, on a linear scale."""
  top = int(max_train_steps * max_fraction)
  if top < 1:
    raise ValueError(f"max_train_steps={max_train_steps} leaves no room for "
                     f"warmup at max_fraction={max_fraction}")
  return {"optimizer.warmup_steps": {"scale": "int_linear", "min": 0,
                                     "max": top}}


def weight_decay_nuisance(weight_decay: Range = (1e-5, 1e-2)) -> dict[str, Any]:
  """Weight decay on a log scale (it interacts with model size)."""
  return {"optimizer.weight_decay": _log(*weight_decay)}


def default_search_space(config: ml_collections.ConfigDict,
                         num_trials: int | None = None) -> dict[str, Any]:
  """The nuisance hyperparameters of `config.optimizer.name`, with warmup
  and weight decay; the optimizer itself stays fixed.

  Warmup spans 0 to 10% of `config.max_train_steps`. `num_trials`, the trial
  budget of the study, picks Adam's hyperparameters (see adam_nuisance); the
  other optimizers do not need it.
  """
  name = config.optimizer.name
  if name in ("adam", "nadam"):
    if num_trials is None:
      raise ValueError(f"optimizer.name={name!r}: which of Adam's "
                       "hyperparameters to tune depends on the trial budget; "
                       "give num_trials")
    nuisance = adam_nuisance(num_trials)
  elif name in ("momentum", "nesterov"):
    nuisance = momentum_nuisance()
  elif name == "rmsprop":
    nuisance = {"optimizer.learning_rate": _log(1e-5, 1e-1),
                "optimizer.rho": _reverse_log(0.5, 0.999)}
  else:
    nuisance = {"optimizer.learning_rate": _log(1e-3, 1.0)}
  nuisance.update(warmup_nuisance(config.max_train_steps))
  nuisance.update(weight_decay_nuisance())
  return {
      "name": f"{config.workload}_{name}_default",
      "description": f"{name}: tune {', '.join(nuisance)} "
                     "(quasi-random search).",
      "algorithm": "quasi_random",
      "nuisance": nuisance,
  }


def default_get_search_space(
    get_config: Callable[[], ml_collections.ConfigDict],
) -> Callable[..., dict[str, Any]]:
  """A config file's `get_search_space(config, num_trials)` that returns
  `default_search_space`, of `get_config()` when no config is given."""

  def get_search_space(config: ml_collections.ConfigDict | None = None,
                       num_trials: int | None = None) -> dict[str, Any]:
    """The default study of `config` (default: the file's `get_config()`)."""
    if config is None:
      config = get_config()
    return default_search_space(config, num_trials)

  return get_search_space


def _warmup_steps_up_to(max_steps: int) -> list[int]:
  steps, w = [], 10
  while w <= max_steps:
    steps.append(w)
    w *= 10
  return steps


def warmup_study(unstable_base_learning_rate: float, *,
                 warmup_steps: Sequence[int] | None = None,
                 max_train_steps: int | None = None,
                 learning_rate_factors: Sequence[float] = (10.0,),
                 post_warmup_factor: int = 2) -> dict[str, Any]:
  """A grid study for the shortest warmup that makes a high rate stable.

  Every trial ramps the learning rate from 0 to factor x
  `unstable_base_learning_rate` over `warmup_steps`, then holds it for
  `post_warmup_factor` x warmup_steps: max_train_steps is the post-warmup
  length, the warmup is prepended to it.
  `warmup_steps` defaults to 10, 100, ... up to 10% of `max_train_steps`, the
  training length the warmup is meant for.
  """
  if not unstable_base_learning_rate > 0:
    raise ValueError("unstable_base_learning_rate must be > 0")
  if post_warmup_factor < 1:
    raise ValueError(f"post_warmup_factor={post_warmup_factor}: must be >= 1")
  if warmup_steps is None:
    if max_train_steps is None:
      raise ValueError("give warmup_steps or max_train_steps")
    warmup_steps = _warmup_steps_up_to(max_train_steps // 10)
    if not warmup_steps:
      raise ValueError(f"max_train_steps={max_train_steps} is too short for "
                       "a warmup of 10 steps at 10% of training")
  schedules = [{"optimizer.warmup_steps": int(w),
                "max_train_steps": int(w) * post_warmup_factor}
               for w in warmup_steps]
  rates = [float(f * unstable_base_learning_rate)
           for f in learning_rate_factors]
  scientific = {"warmup": {"values": schedules}}
  fixed = {"optimizer.schedule": "constant",
           "optimizer.warmup_mode": "prepended"}
  if len(rates) == 1:
    fixed["optimizer.learning_rate"] = rates[0]
  else:
    scientific["optimizer.learning_rate"] = {"values": rates}
  return {
      "name": "warmup",
      "description": (
          f"Warmup at {', '.join(f'{f:g}' for f in learning_rate_factors)}x "
          f"the unstable learning rate {unstable_base_learning_rate:g}; "
          f"post-warmup = {post_warmup_factor} x warmup_steps."),
      "algorithm": "grid",
      "scientific_mode": "joint",
      "scientific": scientific,
      "fixed": fixed,
  }
