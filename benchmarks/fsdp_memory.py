"""Per-device memory of the train state: data parallel vs fsdp over every device.

  python benchmarks/fsdp_memory.py [--config=configs/imagenet_vit.py] \
      [--config.model.variant=S/16] [--devices=4]

Builds the trainer of the config twice on the same devices, with
`sharding.mesh` = {data: -1, fsdp: 1} (data parallel) and {data: 1, fsdp:
N} (every device on the fsdp axis), on synthetic data and with nothing
trained, and reports for each:

  state:    the bytes of parameters plus optimizer state (plus EMA) that one
            device holds, from the arrays' shardings;
  xla_args: XLA's memory analysis of the compiled train step: the bytes of
            its arguments on one device (the state, one transfer of batches);
  xla_temp: the same analysis' temporaries (activations, gathered
            parameters, gradients).

The last line is `ratio=<state bytes, data parallel / fsdp>`, after
`xla_args_ratio=...`. On CPU the devices are simulated (`--devices`, set
before JAX starts unless XLA_FLAGS already says).
"""

from __future__ import annotations

import os
import sys
import tempfile

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/imagenet_vit.py", "Training config.", lock_config=False)
_DEVICES = flags.DEFINE_integer(
    "devices", 4, "Simulated CPU devices (ignored on accelerators or when "
    "XLA_FLAGS sets a device count).")


def _measure(config, mesh: dict[str, int]) -> dict[str, float]:
  import jax  # pylint: disable=g-import-not-at-top
  from tuning_playbook.training import sharding, train  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.sharding.mesh = mesh
  workload = train.validate_before_compiling(config)
  with tempfile.TemporaryDirectory() as workdir:
    trainer = train.Trainer([config], [workdir], [workload])
    abstract = trainer.programs.abstract_trial
    state = sharding.bytes_per_device(
        {"params": abstract.params, "opt_state": abstract.opt_state,
         "ema_params": abstract.ema_params})
    analysis = trainer.lower_train_step().compile().memory_analysis()
    jax.block_until_ready(trainer.state)
  return {"state": state,
          "xla_args": getattr(analysis, "argument_size_in_bytes", float("nan")),
          "xla_temp": getattr(analysis, "temp_size_in_bytes", float("nan"))}


def main(argv):
  del argv  # Unused.
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_DEVICES.value}")
  from tuning_playbook.common import cpu_devices  # pylint: disable=g-import-not-at-top
  cpu_devices.configure_thread_pool()
  import jax  # pylint: disable=g-import-not-at-top
  n = jax.device_count()
  config = _CONFIG.value
  with config.unlocked():
    config.data.synthetic = True
    if config.batch_size % n:
      config.batch_size = n * max(1, config.batch_size // n)
  print(f"config={_CONFIG.value.workload} model={dict(config.model)} "
        f"batch_size={config.batch_size} devices={n} ({jax.devices()[0].device_kind})")
  dp = _measure(config, {"data": -1, "fsdp": 1})
  fsdp = _measure(config, {"data": 1, "fsdp": n})
  for label, m in (("data_parallel", dp), (f"fsdp={n}", fsdp)):
    print(f"{label}: state={m['state'] / 2**20:.1f} MiB/device "
          f"xla_args={m['xla_args'] / 2**20:.1f} MiB "
          f"xla_temp={m['xla_temp'] / 2**20:.1f} MiB")
  print(f"xla_args_ratio={dp['xla_args'] / fsdp['xla_args']:.3f}")
  print(f"ratio={dp['state'] / fsdp['state']:.3f}")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
