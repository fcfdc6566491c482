"""Random batches of a workload's shapes: training and eval without a data set.

`config.data.synthetic=True` replaces the data set with random arrays shaped
by the workload's `synthetic_spec(config)` (see `tuning_playbook/workload.py`),
so throughput can be measured before, or without, downloading and preparing
data: no TFDS builder is created and the data directory is never touched.

Float inputs are standard normal; integer inputs (token ids, say) and labels
are uniform in [0, num_classes). The training stream cycles through a few
local batches generated once from a NumPy RNG seeded with (config.seed, host),
so a step costs no input time and a resumed run trains on the same batches.
Each host generates only its own share of the global batch. The eval splits
are the same for every seed (trials are scored on the same examples); each is
one global batch of `config.eval_batch_size`, or of `config.batch_size` when
that is 0 (the three splits share it), so its metrics are those of random
labels: an error rate near 1 - 1 / num_classes.

  spec = synthetic_data.workload_spec(config, workload)
  stream = synthetic_data.SyntheticTrainStream(spec, seed=0, local_batch_size=8,
                                               process_index=0, process_count=1)
  batch = next(stream.iterate(0))  # {"inputs": ..., "label": ...}
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tuning_playbook import config_schema
from tuning_playbook import input_pipeline
from tuning_playbook import workload as workload_lib

EVAL_SPLIT_NAMES = ("validation", "train", "test")
# At most this many distinct training batches, and this much host memory for
# them (at least one batch is kept whatever its size).
_MAX_TRAIN_BATCHES = 4
_MAX_TRAIN_BYTES = 1 << 30
_TRAIN_STREAM, _EVAL_STREAM = 0, 1


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """Per-example shapes and dtypes of the inputs and labels, and the classes."""
  inputs: jax.ShapeDtypeStruct
  label: jax.ShapeDtypeStruct
  num_classes: int

  def example_bytes(self) -> int:
    return sum(int(np.prod(s.shape, dtype=np.int64)) * np.dtype(s.dtype).itemsize
               for s in (self.inputs, self.label))


def workload_spec(config: ml_collections.ConfigDict,
                  workload: workload_lib.Workload) -> SyntheticSpec:
  """The workload's `synthetic_spec(config)`, checked.

  Raises ConfigError (bad input) when the workload has none, and TypeError (a
  defect of the workload) when what it returns is malformed.
  """
  if workload.synthetic_spec is None:
    raise config_schema.ConfigError(
        f"config.data.synthetic=True is invalid: workload {workload.name!r} "
        "defines no synthetic_spec(config), so it has no synthetic data (see "
        "tuning_playbook/workload.py); use config.data.synthetic=False")
  raw = workload.synthetic_spec(config)
  where = f"workload {workload.name!r}: synthetic_spec(config)"
  if not isinstance(raw, dict) or set(raw) != {"inputs", "label", "num_classes"}:
    raise TypeError(f"{where} must return a dict with exactly the keys "
                    f"inputs, label, num_classes; got {raw!r}")
  for key in ("inputs", "label"):
    if not isinstance(raw[key], jax.ShapeDtypeStruct):
      raise TypeError(f"{where}[{key!r}] must be a jax.ShapeDtypeStruct "
                      f"(per-example shape and dtype); got {raw[key]!r}")
  if not np.issubdtype(raw["label"].dtype, np.integer):
    raise TypeError(f"{where}['label'] must have an integer dtype; got "
                    f"{raw['label'].dtype}")
  num_classes = raw["num_classes"]
  if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
    raise TypeError(f"{where}['num_classes'] must be an int >= 1; got {num_classes!r}")
  return SyntheticSpec(inputs=raw["inputs"], label=raw["label"],
                       num_classes=num_classes)


def _draw(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any,
          num_classes: int) -> np.ndarray:
  dtype = np.dtype(dtype)
  if dtype == np.bool_:
    return rng.integers(0, 2, size=shape).astype(np.bool_)
  if np.issubdtype(dtype, np.integer):
    high = min(num_classes, int(np.iinfo(dtype).max) + 1)
    return rng.integers(0, high, size=shape, dtype=dtype)
  if jnp.issubdtype(dtype, jnp.floating):  # bfloat16 too, unlike np.issubdtype.
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype)
  raise TypeError(f"synthetic data of dtype {dtype} is not supported")


def random_examples(spec: SyntheticSpec, n: int,
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
  """`n` random examples: {"inputs": [n, ...], "label": [n, ...]}."""
  return {"inputs": _draw(rng, (n,) + tuple(spec.inputs.shape), spec.inputs.dtype,
                          spec.num_classes),
          "label": _draw(rng, (n,) + tuple(spec.label.shape), spec.label.dtype,
                         spec.num_classes)}


_EVAL_SEED = 0  # The eval splits do not depend on config.seed.


def _rng(seed: int, process_index: int, stream: int) -> np.random.Generator:
  return np.random.default_rng([seed, process_index, stream])


class SyntheticTrainStream:
  """Same interface as `input_pipeline.TrainStream`, over a few fixed batches.

  Step s trains on local batch `s % num_batches`; an "epoch" is one cycle.
  """

  def __init__(self, spec: SyntheticSpec, *, seed: int, local_batch_size: int,
               process_index: int, process_count: int):
    self._spec = spec
    self.local_batch_size = local_batch_size
    batch_bytes = max(1, local_batch_size * spec.example_bytes())
    self.num_batches = int(np.clip(_MAX_TRAIN_BYTES // batch_bytes, 1,
                                   _MAX_TRAIN_BATCHES))
    rng = _rng(seed, process_index, _TRAIN_STREAM)
    self._batches = [random_examples(spec, local_batch_size, rng)
                     for _ in range(self.num_batches)]
    self.examples_per_epoch = self.num_batches * local_batch_size
    # Each host draws its own batches: the data depends on the host count.
    self.layout = [self.examples_per_epoch] * process_count

  def position(self, step: int) -> input_pipeline.DataPosition:
    return input_pipeline.DataPosition(
        step=step, epoch=step // self.num_batches,
        offset_in_epoch=step % self.num_batches * self.local_batch_size,
        examples_per_epoch=self.examples_per_epoch)

  def element_spec(self) -> tuple[tuple[int, ...], np.dtype]:
    """Shape (without batch) and dtype of the model inputs."""
    return tuple(self._spec.inputs.shape), np.dtype(self._spec.inputs.dtype)

  def iterate(self, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    """Local batches from `start_step` on, in order (never ends)."""
    for step in itertools.count(start_step):
      yield dict(self._batches[step % self.num_batches])


@dataclasses.dataclass
class SyntheticEvalSplit:
  """Same interface as `input_pipeline.EvalSplit`: one batch, nothing padded."""
  name: str
  batch: dict[str, np.ndarray]
  local_batch_size: int
  total_examples: int
  num_batches: int = 1

  @property
  def host_examples(self) -> int:
    return self.local_batch_size

  def batches(self) -> Iterator[dict[str, np.ndarray]]:
    """The local batch, with a float32 `weight` of 1 for every row."""
    yield dict(self.batch)

  def local_batch_spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each array of this host's batch."""
    return {k: (v.shape, v.dtype) for k, v in self.batch.items()}


def make_eval_splits(spec: SyntheticSpec, *, local_batch_size: int,
                     process_index: int, process_count: int
                     ) -> list[SyntheticEvalSplit]:
  """Validation, train and test splits of one shared random global batch.

  The same for every `config.seed`, as a data set's eval splits are: trials
  of a study are scored on the same examples.
  """
  batch = random_examples(spec, local_batch_size,
                          _rng(_EVAL_SEED, process_index, _EVAL_STREAM))
  batch["weight"] = np.ones((local_batch_size,), np.float32)
  return [SyntheticEvalSplit(name=name, batch=batch,
                             local_batch_size=local_batch_size,
                             total_examples=local_batch_size * process_count)
          for name in EVAL_SPLIT_NAMES]
