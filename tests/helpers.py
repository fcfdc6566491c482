"""Shared helpers for tests: load configs, run the trainer in a subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "tests", "configs", "tiny.py")


def load_config(path: str = TINY_CONFIG, **overrides):
  """Loads `get_config()` from a config file and applies dotted overrides."""
  spec = importlib.util.spec_from_file_location("_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def main_command(workdir: str, *overrides: str, config: str = TINY_CONFIG) -> list[str]:
  return [sys.executable, "-m", "tuning_playbook.main", f"--config={config}",
          f"--workdir={workdir}", *overrides]


# Runs of tiny models compile far more than they compute: without LLVM's
# optimisations their programs compile in a fraction of the time. Every
# program the tests compile, in-process (tests/conftest.py) or in the
# subprocesses below, is compiled so, so runs are compared only with runs
# under the same flag.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(num_devices: int) -> str:
  """XLA_FLAGS of a test's process: `num_devices` simulated CPU devices."""
  return f"--xla_force_host_platform_device_count={num_devices} {FAST_COMPILE}"


def subprocess_env(num_devices: int = 1, fast_compile: bool = True) -> dict[str, str]:
  """The environment of a process a test starts: this one's, with its own
  simulated devices, less what the harness set for itself alone."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (xla_flags(num_devices) if fast_compile else
                      f"--xla_force_host_platform_device_count={num_devices}")
  # The trainer sizes the CPU thread pool for its simulated devices itself.
  for name in ("PJRT_NPROC", "NPROC"):
    env.pop(name, None)
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def run_main(workdir: str, *overrides: str, num_devices: int = 1,
             config: str = TINY_CONFIG, timeout: float = 300,
             fast_compile: bool = True) -> subprocess.CompletedProcess:
  return subprocess.run(main_command(workdir, *overrides, config=config),
                        cwd=REPO, env=subprocess_env(num_devices, fast_compile),
                        capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: str) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def without_timing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Metrics rows less their wall-clock measurements (`perf/*`), which differ
  between runs that are otherwise identical."""
  return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_processes(command: list[str], num_processes: int, devices_per_process: int,
                    port: int | None = None) -> list[subprocess.Popen]:
  """Starts one job of `num_processes` real processes joined on 127.0.0.1."""
  port = port or free_port()
  procs = []
  for i in range(num_processes):
    args = command + [f"--coordinator_address=127.0.0.1:{port}",
                      f"--num_processes={num_processes}", f"--process_id={i}",
                      "--distributed_timeout_seconds=60"]
    procs.append(subprocess.Popen(
        args, cwd=REPO, env=subprocess_env(devices_per_process),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
  """(returncode, stderr) of each process; kills all on timeout."""
  out = []
  try:
    for p in procs:
      _, err = p.communicate(timeout=timeout)
      out.append((p.returncode, err))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return out
