"""Which GPUs or TPU chips each study worker owns.

A study worker is one JAX process, and a JAX process takes every accelerator
it sees (on a GPU, 75% of its memory; a TPU chip, whole). On a host with G
GPUs or TPU chips a launch therefore runs G // N workers (N =
--devices_per_worker, default 1; --parallel may ask for fewer), and worker i
sees only its own N devices:

  GPU  CUDA_VISIBLE_DEVICES=<ids>, split within the user's CUDA_VISIBLE_DEVICES
       when it is set. Workers sharing GPUs (--share_devices, more workers
       than groups of N) each preallocate their part of 75% of the memory
       (XLA_PYTHON_CLIENT_MEM_FRACTION), unless a memory setting is given.
  TPU  TPU_VISIBLE_CHIPS=<ids> with TPU_CHIPS_PER_PROCESS_BOUNDS=<the N chips'
       box>, TPU_PROCESS_BOUNDS=1,1,1, CLOUD_TPU_TASK_ID=0 and a port of its
       own (TPU_PROCESS_PORT, TPU_PROCESS_ADDRESSES): a slice of one process.
       A chip cannot be shared.

The devices are counted without starting JAX, which would take them from the
workers: CUDA_VISIBLE_DEVICES when set, else `nvidia-smi -L`, else
/proc/driver/nvidia/gpus; TPU chips from /dev/accel* or /dev/vfio/*. A
platform counts only where JAX can use it: its plugin (jax[cuda]) or libtpu is
installed and JAX_PLATFORMS, when set, names it. On a host without either
nothing changes: --parallel workers (default 1) each see every (simulated) CPU
device, with no visible-device variable.

  host = worker_devices.read_host()
  envs = worker_devices.worker_environments(
      worker_devices.find_devices(host), parallel=None, devices_per_worker=None,
      share=False, environ=host.environ)   # One dict of variables per worker.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import importlib.util
import os
import re
import shutil
import subprocess
from typing import Mapping, Sequence

GPU = "gpu"
TPU = "tpu"
CPU = "cpu"

# JAX's default GPU preallocation, split between the workers sharing a GPU.
GPU_MEMORY_FRACTION = 0.75
GPU_MEMORY_VARIABLES = ("XLA_PYTHON_CLIENT_MEM_FRACTION",
                        "XLA_PYTHON_CLIENT_PREALLOCATE",
                        "XLA_PYTHON_CLIENT_ALLOCATOR")
# libtpu's default port; worker i listens on TPU_BASE_PORT + i.
TPU_BASE_PORT = 8476
# TPU_CHIPS_PER_PROCESS_BOUNDS of a process owning this many chips.
TPU_CHIP_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1", 8: "2,4,1"}

_CUDA_PLUGINS = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13",
                 "jax_cuda12_plugin", "jax_cuda13_plugin")
_GPU_LINE = re.compile(r"^GPU (\d+):")
_MIG_LINE = re.compile(r"^\s+MIG .*\(UUID: (MIG-[^)]+)\)")
_NVIDIA_PROC_GPUS = "/proc/driver/nvidia/gpus"


class DeviceError(ValueError):
  """Worker counts the host's accelerators cannot serve."""


@dataclasses.dataclass(frozen=True)
class HostView:
  """What device detection reads from the host (built by hand in tests)."""
  environ: Mapping[str, str]
  # Accelerator platforms JAX has installed: a subset of {"gpu", "tpu"}.
  jax_platforms: frozenset[str] = frozenset()
  nvidia_smi: Sequence[str] | None = None  # `nvidia-smi -L` lines, if it ran.
  proc_gpus: Sequence[str] = ()  # Entries of /proc/driver/nvidia/gpus.
  accel: Sequence[str] = ()  # /dev/accel<N> paths.
  vfio: Sequence[str] = ()  # Entries of /dev/vfio.


@dataclasses.dataclass(frozen=True)
class HostDevices:
  """The accelerators the workers divide, as their visible-device ids."""
  platform: str  # GPU, TPU or CPU (none).
  ids: tuple[str, ...] = ()
  source: str = ""  # Where they were found, for messages.

  def noun(self, count: int) -> str:
    """"3 GPUs", "1 TPU chip"."""
    name = {GPU: "GPU", TPU: "TPU chip"}[self.platform]
    return f"{count} {name}{'s' if count != 1 else ''}"

  def describe(self) -> str:
    return f"{self.noun(len(self.ids))} found ({self.source})"


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


def _run_nvidia_smi() -> list[str] | None:
  if shutil.which("nvidia-smi") is None:
    return None
  try:
    result = subprocess.run(["nvidia-smi", "-L"], capture_output=True,
                            text=True, timeout=30, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return result.stdout.splitlines() if result.returncode == 0 else None


def _listdir(path: str) -> list[str]:
  try:
    return sorted(os.listdir(path))
  except OSError:
    return []


def read_host(environ: Mapping[str, str] = os.environ) -> HostView:
  """Reads this host's view of its accelerators; starts no JAX backend."""
  platforms = frozenset(
      platform for platform, installed in (
          (GPU, any(_installed(m) for m in _CUDA_PLUGINS)),
          (TPU, _installed("libtpu"))) if installed)
  wants_gpu = GPU in platforms and "CUDA_VISIBLE_DEVICES" not in environ
  return HostView(
      environ=dict(environ), jax_platforms=platforms,
      nvidia_smi=_run_nvidia_smi() if wants_gpu else None,
      proc_gpus=_listdir(_NVIDIA_PROC_GPUS) if wants_gpu else (),
      accel=sorted(glob.glob("/dev/accel[0-9]*")) if TPU in platforms else (),
      vfio=_listdir("/dev/vfio") if TPU in platforms else ())


def _split_ids(value: str) -> tuple[str, ...]:
  """The ids of a visible-devices list; CUDA stops at a negative one."""
  ids = []
  for part in value.split(","):
    part = part.strip()
    if not part or part.startswith("-"):
      break
    ids.append(part)
  return tuple(ids)


def _nvidia_smi_ids(lines: Sequence[str]) -> tuple[str, ...]:
  """GPU indices of `nvidia-smi -L`; a GPU split by MIG gives its instances."""
  gpus: dict[str, list[str]] = {}
  current = None
  for line in lines:
    if match := _GPU_LINE.match(line):
      current = match.group(1)
      gpus[current] = []
    elif (match := _MIG_LINE.match(line)) and current is not None:
      gpus[current].append(match.group(1))
  return tuple(i for gpu, migs in gpus.items() for i in (migs or [gpu]))


def _allowed(platform: str, environ: Mapping[str, str]) -> bool:
  """Whether JAX_PLATFORMS, when set, lets JAX use the platform."""
  names = {p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",")
           if p.strip()}
  aliases = {GPU: {"cuda", "gpu"}, TPU: {"tpu"}}[platform]
  return not names or bool(names & aliases)


def _gpus(host: HostView) -> HostDevices:
  if "CUDA_VISIBLE_DEVICES" in host.environ:
    value = host.environ["CUDA_VISIBLE_DEVICES"]
    return HostDevices(GPU, _split_ids(value), f"CUDA_VISIBLE_DEVICES={value}")
  if host.nvidia_smi is not None:
    return HostDevices(GPU, _nvidia_smi_ids(host.nvidia_smi), "nvidia-smi -L")
  return HostDevices(GPU, tuple(str(i) for i in range(len(host.proc_gpus))),
                     _NVIDIA_PROC_GPUS)


def _tpus(host: HostView) -> HostDevices:
  if "TPU_VISIBLE_CHIPS" in host.environ:
    value = host.environ["TPU_VISIBLE_CHIPS"]
    return HostDevices(TPU, _split_ids(value), f"TPU_VISIBLE_CHIPS={value}")
  if host.accel:
    return HostDevices(TPU, tuple(str(i) for i in range(len(host.accel))),
                       "/dev/accel*")
  groups = [name for name in host.vfio if name.isdigit()]
  return HostDevices(TPU, tuple(str(i) for i in range(len(groups))),
                     "/dev/vfio/*")


def find_devices(host: HostView) -> HostDevices:
  """The GPUs, else the TPU chips, JAX would use on this host; else CPU."""
  for platform, find in ((GPU, _gpus), (TPU, _tpus)):
    if platform in host.jax_platforms and _allowed(platform, host.environ):
      devices = find(host)
      if devices.ids:
        return devices
  return HostDevices(CPU)


def _or_list(values: Sequence[object]) -> str:
  """"1, 2 or 4"."""
  words = [str(v) for v in values]
  return " or ".join([", ".join(words[:-1]), words[-1]] if len(words) > 1
                     else words)


def _groups(devices: HostDevices, per_worker: int) -> list[tuple[str, ...]]:
  """The host's devices in groups of `per_worker`, or DeviceError."""
  count = len(devices.ids)
  allowed = [n for n in range(1, count + 1) if count % n == 0
             and (devices.platform != TPU or n in TPU_CHIP_BOUNDS)]
  if per_worker not in allowed:
    boxes = (f" (a TPU process owns {_or_list(sorted(TPU_CHIP_BOUNDS))} chips)"
             if devices.platform == TPU else "")
    raise DeviceError(
        f"--devices_per_worker={per_worker} does not split the "
        f"{devices.describe()} into equal groups{boxes}: use "
        f"--devices_per_worker={_or_list(allowed)}")
  return [devices.ids[i:i + per_worker] for i in range(0, count, per_worker)]


def _gpu_environment(ids: Sequence[str], sharing: int,
                     environ: Mapping[str, str]) -> dict[str, str]:
  env = {"CUDA_VISIBLE_DEVICES": ",".join(ids)}
  if sharing > 1 and not any(v in environ for v in GPU_MEMORY_VARIABLES):
    fraction = int(GPU_MEMORY_FRACTION * 1000 / sharing) / 1000
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{fraction:g}"
  return env


def _tpu_environment(ids: Sequence[str], worker: int) -> dict[str, str]:
  port = TPU_BASE_PORT + worker
  return {"TPU_VISIBLE_CHIPS": ",".join(ids),
          "TPU_CHIPS_PER_PROCESS_BOUNDS": TPU_CHIP_BOUNDS[len(ids)],
          "TPU_PROCESS_BOUNDS": "1,1,1",
          "TPU_PROCESS_PORT": str(port),
          "TPU_PROCESS_ADDRESSES": f"localhost:{port}",
          "CLOUD_TPU_TASK_ID": "0",
          # Lets each worker load libtpu beside the others.
          "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def _check_count(devices: HostDevices, workers: int, groups: int,
                 per_worker: int, share: bool) -> None:
  if workers <= groups or (share and devices.platform == GPU):
    return
  remedies = [f"--parallel={groups} or less (the default is {groups})"]
  if per_worker > 1:
    remedies.append("a smaller --devices_per_worker")
  if devices.platform == GPU:
    remedies.append("--share_devices to let workers share GPUs")
  raise DeviceError(
      f"--parallel={workers} asks for more study workers than the devices "
      f"allow: {devices.describe()}, {devices.noun(per_worker)} per worker "
      f"(--devices_per_worker={per_worker}) make {groups}; use "
      f"{_or_list(remedies)}"
      f"{' (TPU chips cannot be shared)' if devices.platform == TPU else ''}")


def worker_environments(devices: HostDevices, *, parallel: int | None,
                        devices_per_worker: int | None, share: bool,
                        environ: Mapping[str, str]) -> list[dict[str, str]]:
  """The variables each study worker gets on top of the launch's environment.

  One dict per worker: --parallel of them on a CPU host (default 1), empty;
  otherwise `parallel` (default: as many as the devices allow) workers, each
  owning `devices_per_worker` (default 1) devices. Raises DeviceError for
  counts the devices cannot serve.
  """
  if devices.platform == CPU:
    if devices_per_worker is not None:
      raise DeviceError(
          f"--devices_per_worker={devices_per_worker} divides GPUs or TPU "
          "chips among study workers, but JAX has none on this host (0 found: "
          "no CUDA_VISIBLE_DEVICES, nvidia-smi, /dev/accel* or /dev/vfio/* "
          "with jax[cuda] or libtpu installed): drop the flag; on CPU the "
          "--parallel workers each see every device")
    return [{} for _ in range(parallel or 1)]
  per_worker = devices_per_worker or 1
  groups = _groups(devices, per_worker)
  workers = parallel or len(groups)
  _check_count(devices, workers, len(groups), per_worker, share)
  owners = [i % len(groups) for i in range(workers)]
  sharing = collections.Counter(owners)
  if devices.platform == TPU:
    return [_tpu_environment(groups[g], i) for i, g in enumerate(owners)]
  return [_gpu_environment(groups[g], sharing[g], environ) for g in owners]
