"""Periodic evaluation on validation, a fixed training subset and test.

All splits share one global eval batch shape, so the eval step compiles once
(`compile`, before training);
padded rows weigh 0, and per-batch sums are fetched together after the last
batch and added in float64, so the metrics equal the exact full-split values.

Loss, accuracy and error rate are means over the targets scored: examples, or
for a per-position workload (a language model, say) the weighted positions
(tokens), whose count is reported as num_targets. num_examples always counts
examples.

`evaluate(state, prefix)` names the metrics `<prefix>/<split>/<metric>`: the
trainer evaluates the raw parameters as `eval/...` and, with
`config.ema_decay > 0`, their moving average as `eval_ema/...` (the same
compiled step: the averaged parameters have the raw ones' shapes).

With `on_device=True` (small in-memory data sets) each split's padded batches
are read once, when the evaluator is built, and kept as global arrays sharded
over the devices (each host holding its share), so an eval reads no input:
the same batches as reading the splits each time, and the same metrics.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from tuning_playbook import input_pipeline
from tuning_playbook.training import sharding


def metrics_from_sums(name: str, loss_sum: float, num_correct: float,
                      num_examples: float, num_targets: float | None = None,
                      prefix: str = "eval") -> dict[str, float]:
  """A split's metrics; the means are over num_targets when given."""
  targets = num_examples if num_targets is None else num_targets
  n = max(targets, 1.0)
  key = f"{prefix}/{name}"
  metrics = {f"{key}/loss": loss_sum / n,
             f"{key}/accuracy": num_correct / n,
             f"{key}/error_rate": (targets - num_correct) / n,
             f"{key}/num_correct": num_correct,
             f"{key}/num_examples": num_examples}
  if num_targets is not None:
    metrics[f"{key}/num_targets"] = num_targets
  return metrics


class Evaluator:
  """Runs the compiled eval step over each eval split."""

  def __init__(self, eval_step: Callable, splits: Sequence[input_pipeline.EvalSplit],
               mesh: jax.sharding.Mesh, state_sharding: Any, *,
               on_device: bool = False):
    self.splits = list(splits)
    self._mesh = mesh
    self._batch_sharding = sharding.batch_sharding(mesh)
    self.compiled_step = jax.jit(
        eval_step, in_shardings=(state_sharding, self._batch_sharding),
        out_shardings=sharding.replicated(mesh))
    self._device_batches = ({split.name: list(self._global_batches(split))
                             for split in self.splits} if on_device else None)

  def for_step(self, eval_step: Callable, state_sharding: Any) -> Evaluator:
    """An evaluator of another eval step over the same splits, sharing the
    batches kept on the devices (e.g. one trial's step beside a population's)."""
    other = Evaluator.__new__(Evaluator)
    other.splits, other._mesh = self.splits, self._mesh
    other._batch_sharding = self._batch_sharding
    other._device_batches = self._device_batches
    other.compiled_step = jax.jit(
        eval_step, in_shardings=(state_sharding, self._batch_sharding),
        out_shardings=sharding.replicated(self._mesh))
    return other

  def compile(self, state) -> None:
    """Compiles the eval step for `state` (arrays or their shapes) now, so
    that an error in it shows before training and no eval pays for it."""
    local = self.splits[0].local_batch_spec()
    batch = {k: jax.ShapeDtypeStruct((shape[0] * jax.process_count(),) + shape[1:],
                                     dtype, sharding=self._batch_sharding)
             for k, (shape, dtype) in local.items()}
    self.compiled_step.lower(state, batch).compile()

  def _global_batches(self, split: input_pipeline.EvalSplit):
    for local_batch in split.batches():
      yield sharding.to_global(local_batch, self._batch_sharding)

  def evaluate(self, state, prefix: str = "eval") -> dict[str, float]:
    """Every split's metrics, keyed `<prefix>/<split>/<metric>`."""
    return self._evaluate(state, prefix, num_trials=None)[0]

  def evaluate_population(self, state, num_trials: int,
                          prefix: str = "eval") -> list[dict[str, float]]:
    """Each trial's metrics, for a step whose sums have a leading trial axis
    (an eval step under `jax.vmap`, see population.py)."""
    return self._evaluate(state, prefix, num_trials=num_trials)

  def _evaluate(self, state, prefix: str,
                num_trials: int | None) -> list[dict[str, float]]:
    results = [{} for _ in range(num_trials or 1)]
    for split in self.splits:
      batches = (self._global_batches(split) if self._device_batches is None
                 else self._device_batches[split.name])
      sums = [self.compiled_step(state, batch) for batch in batches]
      fetched = jax.device_get(sums)
      totals = {k: np.sum(np.stack([np.asarray(s[k], np.float64) for s in fetched]),
                          axis=0) for k in fetched[0]}
      for i, result in enumerate(results):
        total = {k: float(v if num_trials is None else v[i])
                 for k, v in totals.items()}
        if round(total["num_examples"]) != split.total_examples:
          raise RuntimeError(
              f"eval split {split.name!r} weighed {total['num_examples']} "
              f"examples, expected {split.total_examples}")
        result.update(metrics_from_sums(split.name, **total, prefix=prefix))
    return results
