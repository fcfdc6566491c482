"""What JAX trains on: one log line at the start of a run, and a check that an
accelerator is there when one is required.

  platform_check.check_platform(require_accelerator=True, asked_by="--flag")

logs "JAX platform: gpu, 8 devices (process 0 of 1, 8 local: cuda:0 ...);
NVIDIA H200; jax 0.10.2, jaxlib 0.10.2" and raises `NoAcceleratorError` when
JAX found only the CPU. Call it after `distributed.initialize` (it starts the
backend) and before anything is compiled.
"""

from __future__ import annotations

import os

from absl import logging
import jax
import jaxlib

INSTALL_HINT = ("install JAX for the accelerator: pip install -e '.[cuda12]' "
                "(NVIDIA GPU, CUDA 12) or pip install -e '.[tpu]' (Cloud TPU VM)")
_MAX_NAMED_DEVICES = 4
# Device files that show accelerator hardware, whatever JAX found.
_HARDWARE_FILES = (("/dev/nvidia0", "an NVIDIA GPU"), ("/dev/accel0", "a TPU"))


class NoAcceleratorError(RuntimeError):
  """An accelerator was required and JAX found only the CPU."""


def describe() -> str:
  """One line: backend, device counts and names, device kind, versions."""
  local = jax.local_devices()
  names = " ".join(str(d) for d in local[:_MAX_NAMED_DEVICES])
  if len(local) > _MAX_NAMED_DEVICES:
    names += " ..."
  kinds = ", ".join(sorted({d.device_kind for d in local}))
  devices = _count(jax.device_count(), "device")
  return (f"JAX platform: {jax.default_backend()}, {devices} (process "
          f"{jax.process_index()} of {jax.process_count()}, {len(local)} local: "
          f"{names}); {kinds}; {_versions()}")


def _versions() -> str:
  return f"jax {jax.__version__}, jaxlib {jaxlib.__version__}"


def _count(n: int, noun: str) -> str:
  return f"{n} {noun}{'' if n == 1 else 's'}"


def hardware_present() -> list[str]:
  """Accelerators the machine shows (device files), found or not by JAX."""
  return sorted({f"{what} ({path})" for path, what in _HARDWARE_FILES
                 if os.path.exists(path)})


def _causes() -> str:
  """Why JAX may have missed an accelerator, for the error and the warning."""
  parts = []
  hardware = hardware_present()
  if hardware:
    parts.append(f"this machine shows {', '.join(hardware)} that JAX did not use")
  if os.environ.get("JAX_PLATFORMS"):
    parts.append(f"JAX_PLATFORMS={os.environ['JAX_PLATFORMS']} is set")
  return "; ".join(parts)


def check_platform(require_accelerator: bool, asked_by: str) -> str:
  """Logs the platform line; raises NoAcceleratorError when an accelerator is
  required (`asked_by` names the flag or key) and the backend is the CPU.

  Returns the platform line.
  """
  line = describe()
  logging.info("%s", line)
  if jax.default_backend() != "cpu":
    return line
  if require_accelerator:
    causes = _causes()
    raise NoAcceleratorError(
        f"{asked_by} is set, but JAX found no GPU or TPU: it runs on "
        f"{jax.default_backend()} ({_count(jax.device_count(), 'device')}; "
        f"{_versions()})" + (f"; {causes}" if causes else "")
        + f". To train on one, {INSTALL_HINT}.")
  if hardware_present():
    logging.warning("Training on the CPU: %s. To use the accelerator, %s.",
                    _causes(), INSTALL_HINT)
  return line
