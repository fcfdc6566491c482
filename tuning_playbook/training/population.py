"""What a population is: trials trained at once along a leading trial axis.

Trials that share a structure (`structure_key`: the same config except the
seed and the continuous optimizer hyperparameters, which live in the
optimizer state) stack their parameters, optimizer state (hyperparameters
included), BatchNorm statistics, EMA and RNG along a leading axis (`stack`,
`take`), and one compiled program of the single-run train step trains them
all, batched with `jax.vmap` on accelerators or traced side by side on CPUs
(`over_trials`). Each trial follows the computation it would follow alone:
the same initialisation (its seed), the same data order (trials with one
seed share one stream; otherwise each has its own order over one in-memory
copy of the data) and its own hyperparameters and schedule, including a
prepended warmup of its own length. A trial that diverges, or reaches its
last step before the others, is frozen under a mask (`keep_active`) while
the others go on.

`train.Trainer` trains 1..N trials with these pieces (a plain run is a
population of one); `refusal` says why trials cannot share one program, and
the study worker then trains them alone.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tuning_playbook.common import records
from tuning_playbook import config_paths
from tuning_playbook import config_schema
from tuning_playbook.training import in_memory_stream
from tuning_playbook.training import optimizers
from tuning_playbook import workload as workload_lib

# Config keys that may differ between the trials of one population.
VARYING_KEYS = ("seed",) + tuple(f"optimizer.{k}" for k in optimizers.HYPERPARAMETERS)


class PopulationError(ValueError):
  """Trials that cannot be trained as one population."""


def seed_shapes_data(config: ml_collections.ConfigDict,
                     workload: workload_lib.Workload) -> bool:
  """Whether each seed needs a data pipeline of its own (tf.data streams).

  In-memory and synthetic streams give each seed its own order over one
  copy of the data; a tf.data pipeline per trial would not, so trials with
  tf.data input share a population only when their seeds agree.
  """
  return not (config.data.synthetic or in_memory_stream.used_for(config, workload))


def structure_key(config: ml_collections.ConfigDict,
                  workload: workload_lib.Workload,
                  traced: Sequence[str] | None = None) -> str:
  """Trials with equal keys can be trained as one population.

  Everything but `VARYING_KEYS` and the workload's traced hyperparameters
  must agree (model, optimizer and schedule names, batch size, step counts,
  cadences, data, ...): it changes shapes or code. The seed must agree too
  when `seed_shapes_data`. `traced` narrows the traced hyperparameters left
  out to those given (a program's key: the others are compiled in).
  """
  varying = set(VARYING_KEYS)
  if seed_shapes_data(config, workload):
    varying.discard("seed")
  traced = set(workload.traced_hyperparameters if traced is None else traced)
  flat = config_paths.flatten(records.config_to_dict(config))
  # A traced value must be a float in every trial: its type stays in the key.
  return json.dumps({k: type(v).__name__ if k in traced else v
                     for k, v in flat.items() if k not in varying},
                    sort_keys=True, default=str)


def traced_keys(configs: Sequence[ml_collections.ConfigDict],
                workload: workload_lib.Workload) -> tuple[str, ...]:
  """The workload's traced hyperparameters whose values differ between the
  trials: the ones their program takes as values (the others are constants)."""
  flats = [config_paths.flatten(records.config_to_dict(c)) for c in configs]
  return tuple(k for k in workload.traced_hyperparameters
               if len({repr(f.get(k)) for f in flats}) > 1)


def traced_values(configs: Sequence[ml_collections.ConfigDict],
                  keys: Sequence[str]) -> dict[str, np.ndarray]:
  """{key: float32[num_trials]}: each trial's value of each traced key."""
  flats = [config_paths.flatten(records.config_to_dict(c)) for c in configs]
  return {k: np.array([f[k] for f in flats], np.float32) for k in keys}


def refusal(configs: Sequence[ml_collections.ConfigDict],
            workloads: Sequence[workload_lib.Workload]) -> str | None:
  """Why these trials cannot train as one population, or None if they can.

  One trial always can. Several need one structure (`structure_key`), one
  process (a population's trials are stacked on this process's devices) and
  no profile (`profile_steps` traces one trial's steps).
  """
  if len(configs) == 1:
    return None
  if len({structure_key(c, w) for c, w in zip(configs, workloads)}) > 1:
    return ("the trials differ in more than " + ", ".join(VARYING_KEYS) +
            "; train them in separate populations")
  if jax.process_count() > 1:
    return ("a population trains in one process; run multi-process trials "
            "alone (tuning_playbook.main)")
  if any(config_schema.profile_step_range(c) is not None for c in configs):
    return "config.profile_steps traces one trial: train profiled trials alone"
  return None


def keep_active(active: jax.Array, new: Any, old: Any) -> Any:
  """Leaves of `new` for active trials, of `old` (unchanged) for the others."""
  def keep(n, o):
    return jnp.where(active.reshape(active.shape + (1,) * (n.ndim - 1)), n, o)
  return jax.tree.map(keep, new, old)


def over_trials(fn: Callable, in_axes: Sequence[int | None], num_trials: int,
                mode: str) -> Callable:
  """`fn` applied to each trial's slice of the arguments with a trial axis.

  "vmap" batches the trials into one computation (`jax.vmap`): large kernels,
  what accelerators want. "unroll" traces `fn` once per trial into the same
  program: independent computations, which XLA:CPU runs side by side on its
  cores with the single-trial kernels (about twice as fast as "vmap" for a
  small CNN on 2 cores, at a compile time that grows with the trial count).
  """
  if mode == "vmap":
    return jax.vmap(fn, in_axes=tuple(in_axes))
  if mode != "unroll":
    raise ValueError(f"mode={mode!r}: allowed: vmap, unroll")

  def unrolled(*args):
    outs = [fn(*[a if axis is None else take(a, i)
                 for a, axis in zip(args, in_axes)]) for i in range(num_trials)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

  return unrolled


def default_mode(num_trials: int) -> str:
  """"unroll" on CPUs and for one trial (no vmap, the single-trial program),
  "vmap" for several on accelerators (see `over_trials`)."""
  return ("unroll" if num_trials == 1 or jax.default_backend() == "cpu"
          else "vmap")


def take(tree: Any, index: int) -> Any:
  """One trial's slice of a stacked tree."""
  return jax.tree.map(lambda x: x[index], tree)


def stack(*trees: Any) -> Any:
  """Trees of one trial each, stacked along a new leading trial axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


