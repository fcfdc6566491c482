"""Periodic evaluation on validation, a fixed training subset and test.

All splits share one global eval batch shape, so the eval step compiles once;
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
from tuning_playbook import sharding


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

  def _global_batches(self, split: input_pipeline.EvalSplit):
    for local_batch in split.batches():
      yield sharding.to_global(local_batch, self._batch_sharding)

  def evaluate(self, state, prefix: str = "eval") -> dict[str, float]:
    """Every split's metrics, keyed `<prefix>/<split>/<metric>`."""
    results = {}
    for split in self.splits:
      batches = (self._global_batches(split) if self._device_batches is None
                 else self._device_batches[split.name])
      sums = [self.compiled_step(state, batch) for batch in batches]
      fetched = jax.device_get(sums)
      total = {k: float(np.sum([np.float64(s[k]) for s in fetched]))
               for k in fetched[0]}
      if round(total["num_examples"]) != split.total_examples:
        raise RuntimeError(
            f"eval split {split.name!r} weighed {total['num_examples']} "
            f"examples, expected {split.total_examples}")
      results.update(metrics_from_sums(split.name, **total, prefix=prefix))
    return results
