"""Throughput of a run: FLOPs per step, achieved FLOP/s and MFU, input wait.

The FLOPs of a train step are what XLA's cost analysis counts in the compiled
program, which is partitioned per device, times the device count: every
multiply-add the devices execute, replicated optimizer updates included.
MFU is achieved FLOP/s over the bf16 dense peak of all devices (known chips
only; a float32 run is measured against the same peak).

  monitor = throughput.ThroughputMonitor(batch_size=128, input_bound_threshold=0.2)
  monitor.set_step_flops(throughput.step_flops(compiled, jax.device_count()))
  row.update(monitor.interval(first_step=1, last_step=50, seconds=2.0,
                              input_wait_seconds=0.1))
  summary.update(monitor.summary())
"""

from __future__ import annotations

import re
from typing import Any

from absl import logging
import jax

# bf16 dense peak FLOP/s per chip or GPU, matched against
# `jax.devices()[0].device_kind` (case-insensitive, first match wins, so a
# variant comes before its family). Sources: the vendors' pages.
_TPU = "https://cloud.google.com/tpu/docs/"
_NVIDIA = "https://www.nvidia.com/en-us/data-center/"
PEAK_BF16_FLOPS = (
    # (device_kind pattern, TFLOP/s, source)
    (r"TPU v4", 275, _TPU + "v4"),
    (r"TPU v5 ?lite|TPU v5e", 197, _TPU + "v5e"),
    (r"TPU v5p|TPU v5$", 459, _TPU + "v5p"),
    (r"TPU v6 ?lite|TPU v6e|Trillium", 918, _TPU + "v6e"),
    # Datasheets give 2x these "with sparsity"; the dense peak is half.
    (r"A100", 312, _NVIDIA + "a100/"),
    (r"H100.*PCIe", 756, _NVIDIA + "h100/"),
    (r"H100.*NVL", 835, _NVIDIA + "h100/"),
    (r"H100", 989, _NVIDIA + "h100/"),  # SXM, e.g. "NVIDIA H100 80GB HBM3".
    (r"H200.*NVL", 835, _NVIDIA + "h200/"),
    (r"H200", 989, _NVIDIA + "h200/"),
)


def peak_flops_per_device(device_kind: str) -> float | None:
  """bf16 dense peak FLOP/s of one device of this kind; None if unknown (CPU)."""
  for pattern, tflops, _ in PEAK_BF16_FLOPS:
    if re.search(pattern, device_kind, re.IGNORECASE):
      return tflops * 1e12
  return None


def step_flops(compiled: jax.stages.Compiled, num_devices: int) -> float | None:
  """FLOPs of one execution of `compiled` on all `num_devices` devices.

  None when the backend reports no cost analysis.
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("No XLA cost analysis of the train step: %s", e)
    return None
  if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per program.
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get("flops")
  if flops is None or flops < 0:
    return None
  return float(flops) * num_devices


class ThroughputMonitor:
  """Turns each log interval's wall time and input wait into `perf/*` metrics.

  Also keeps the totals the summary reports, and warns (with the figures)
  when the loop waited for its input more than `input_bound_threshold` of an
  interval: the first time, then each time the count of such intervals
  doubles. The run is input-bound when the mean share over its intervals
  exceeds the threshold (`summary["input_bound"]["flagged"]`). A wait counts
  only while the devices have finished every step dispatched so far.

    monitor = ThroughputMonitor(batch_size=128, input_bound_threshold=0.2)
    monitor.interval(first_step=51, last_step=100, seconds=1.9,
                     input_wait_seconds=0.6)  # warns: 32% > 20%
  """

  def __init__(self, batch_size: int, input_bound_threshold: float,
               device_kind: str = "", device_count: int = 1):
    self.batch_size = batch_size
    self.threshold = input_bound_threshold
    self.device_kind = device_kind
    self.device_count = device_count
    per_device = peak_flops_per_device(device_kind)
    self.peak = per_device * device_count if per_device else None
    self.flops_per_step: float | None = None
    self._intervals = self._over = self._steps = 0
    self._seconds = self._wait = self._max_fraction = self._sum_fraction = 0.0

  def set_step_flops(self, flops: float | None) -> None:
    self.flops_per_step = flops
    logging.info(
        "Train step: %s FLOPs per step (XLA cost analysis, %d device(s) of kind "
        "%r); peak %s FLOP/s.",
        "unknown" if flops is None else f"{flops:.4g}", self.device_count,
        self.device_kind, "unknown" if self.peak is None else f"{self.peak:.4g}")

  def interval(self, first_step: int, last_step: int, seconds: float,
               input_wait_seconds: float) -> dict[str, float]:
    """The `perf/*` metrics of steps first_step..last_step, timed in `seconds`."""
    steps = last_step - first_step + 1
    seconds = max(seconds, 1e-9)
    fraction = min(input_wait_seconds / seconds, 1.0)
    self._intervals += 1
    self._steps += steps
    self._seconds += seconds
    self._wait += input_wait_seconds
    self._sum_fraction += fraction
    self._max_fraction = max(self._max_fraction, fraction)
    row = {"perf/examples_per_second": self.batch_size * steps / seconds,
           "perf/input_wait_fraction": fraction}
    if self.flops_per_step is not None:
      row["perf/flops_per_second"] = self.flops_per_step * steps / seconds
      if self.peak:
        row["perf/mfu"] = row["perf/flops_per_second"] / self.peak
    if fraction > self.threshold:
      self._over += 1
      if self._over & (self._over - 1) == 0:  # 1, 2, 4, 8, ...
        logging.warning(
            "Input-bound: steps %d..%d waited %.3gs of %.3gs (%.0f%%) for the next "
            "batch (input_bound_warning_fraction=%g; %d interval(s) so far). "
            "Raise data.prefetch_batches or data.batches_per_transfer, or cache "
            "the data (data.cache).", first_step, last_step, input_wait_seconds,
            seconds, 100 * fraction, self.threshold, self._over)
    return row

  def summary(self) -> dict[str, Any]:
    """`perf` and `input_bound` entries of summary.json (this process's intervals)."""
    seconds = max(self._seconds, 1e-9)
    perf = {"flops_per_step": self.flops_per_step, "device_kind": self.device_kind,
            "device_count": self.device_count, "peak_flops_per_second": self.peak,
            "steps_timed": self._steps, "seconds_timed": self._seconds,
            "examples_per_second": (self.batch_size * self._steps / seconds
                                    if self._steps else None)}
    if self.flops_per_step is not None and self._steps:
      perf["flops_per_second"] = self.flops_per_step * self._steps / seconds
      if self.peak:
        perf["mfu"] = perf["flops_per_second"] / self.peak
    mean = self._sum_fraction / self._intervals if self._intervals else None
    input_bound = {
        "flagged": mean is not None and mean > self.threshold,
        "max_wait_fraction": self._max_fraction if self._intervals else None,
        "mean_wait_fraction": mean, "wait_seconds": self._wait,
        "intervals": self._intervals, "intervals_over_threshold": self._over,
        "threshold": self.threshold}
    return {"perf": perf, "input_bound": input_bound}

  def log_input_bound(self) -> None:
    """A closing warning if any interval was input-bound."""
    if self._over:
      mean = self._sum_fraction / self._intervals
      logging.warning(
          "Waited for input over input_bound_warning_fraction=%g of the interval "
          "in %d of %d log intervals (mean %.0f%%, max %.0f%%): the run %s "
          "input-bound.", self.threshold, self._over, self._intervals,
          100 * mean, 100 * self._max_fraction,
          "is" if mean > self.threshold else "is not, on average,")
