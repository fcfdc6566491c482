"""One study worker per accelerator: device detection, each worker's
variables, refusals, and launches on CPU (unchanged) and on simulated GPUs."""

import os
import signal
import sys

import pytest

from tests import helpers
from tests import test_sweep
from tuning_playbook.studies import study as study_lib
from tuning_playbook.studies import study_launch
from tuning_playbook.studies import study_runner
from tuning_playbook.studies import worker_devices

GPU_VARIABLES = ("CUDA_VISIBLE_DEVICES", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                 "XLA_PYTHON_CLIENT_PREALLOCATE")
TPU_VARIABLES = ("TPU_VISIBLE_CHIPS", "TPU_CHIPS_PER_PROCESS_BOUNDS",
                 "TPU_PROCESS_BOUNDS", "TPU_PROCESS_PORT",
                 "TPU_PROCESS_ADDRESSES", "CLOUD_TPU_TASK_ID")


def _gpu_host(count=8, environ=None):
  lines = [f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:04d})"
           for i in range(count)]
  return worker_devices.HostView(environ=environ or {}, nvidia_smi=lines,
                                 jax_platforms=frozenset({"gpu"}))


def _tpu_host(chips=4, environ=None):
  return worker_devices.HostView(
      environ=environ or {}, jax_platforms=frozenset({"tpu"}),
      accel=[f"/dev/accel{i}" for i in range(chips)])


def _envs(host, parallel=None, devices_per_worker=None, share=False):
  return worker_devices.worker_environments(
      worker_devices.find_devices(host), parallel=parallel,
      devices_per_worker=devices_per_worker, share=share,
      environ=host.environ)


def _refusal(host, **kwargs):
  with pytest.raises(worker_devices.DeviceError) as e:
    _envs(host, **kwargs)
  return str(e.value)


def test_eight_gpus_give_eight_workers_of_one_gpu_each():
  devices = worker_devices.find_devices(_gpu_host())
  assert devices.platform == worker_devices.GPU
  assert devices.describe() == "8 GPUs found (nvidia-smi -L)"
  # One worker per GPU keeps JAX's preallocation: no memory variable.
  assert _envs(_gpu_host()) == [{"CUDA_VISIBLE_DEVICES": str(i)}
                                for i in range(8)]
  assert _envs(_gpu_host(), parallel=3) == [{"CUDA_VISIBLE_DEVICES": str(i)}
                                            for i in range(3)]


def test_two_gpus_per_worker():
  assert _envs(_gpu_host(), devices_per_worker=2) == [
      {"CUDA_VISIBLE_DEVICES": ids} for ids in ("0,1", "2,3", "4,5", "6,7")]
  assert _envs(_gpu_host(), devices_per_worker=8) == [
      {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}]


def test_workers_split_the_users_cuda_visible_devices():
  host = _gpu_host(environ={"CUDA_VISIBLE_DEVICES": "2,3,5,7"})
  assert worker_devices.find_devices(host).describe() == (
      "4 GPUs found (CUDA_VISIBLE_DEVICES=2,3,5,7)")
  assert _envs(host) == [{"CUDA_VISIBLE_DEVICES": i} for i in "2357"]
  assert _envs(host, devices_per_worker=2) == [
      {"CUDA_VISIBLE_DEVICES": "2,3"}, {"CUDA_VISIBLE_DEVICES": "5,7"}]
  uuids = worker_devices.HostView(
      environ={"CUDA_VISIBLE_DEVICES": "GPU-aa, GPU-bb"},
      jax_platforms=frozenset({"gpu"}))
  assert _envs(uuids) == [{"CUDA_VISIBLE_DEVICES": "GPU-aa"},
                          {"CUDA_VISIBLE_DEVICES": "GPU-bb"}]


def test_gpus_found_without_nvidia_smi_and_mig_instances():
  proc = worker_devices.HostView(
      environ={}, jax_platforms=frozenset({"gpu"}),
      proc_gpus=["0000:17:00.0", "0000:65:00.0"])
  assert worker_devices.find_devices(proc).describe() == (
      "2 GPUs found (/proc/driver/nvidia/gpus)")
  assert _envs(proc) == [{"CUDA_VISIBLE_DEVICES": "0"},
                         {"CUDA_VISIBLE_DEVICES": "1"}]
  mig = worker_devices.HostView(
      environ={}, jax_platforms=frozenset({"gpu"}), nvidia_smi=[
          "GPU 0: NVIDIA A100 (UUID: GPU-a)",
          "  MIG 3g.40gb     Device  0: (UUID: MIG-a0)",
          "  MIG 3g.40gb     Device  1: (UUID: MIG-a1)",
          "GPU 1: NVIDIA A100 (UUID: GPU-b)"])
  assert worker_devices.find_devices(mig).ids == ("MIG-a0", "MIG-a1", "1")


def test_four_chip_tpu_host():
  envs = _envs(_tpu_host())
  assert envs == [{"TPU_VISIBLE_CHIPS": str(i),
                   "TPU_CHIPS_PER_PROCESS_BOUNDS": "1,1,1",
                   "TPU_PROCESS_BOUNDS": "1,1,1",
                   "TPU_PROCESS_PORT": str(8476 + i),
                   "TPU_PROCESS_ADDRESSES": f"localhost:{8476 + i}",
                   "CLOUD_TPU_TASK_ID": "0",
                   "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"} for i in range(4)]
  pairs = _envs(_tpu_host(), devices_per_worker=2)
  assert [(e["TPU_VISIBLE_CHIPS"], e["TPU_CHIPS_PER_PROCESS_BOUNDS"],
           e["TPU_PROCESS_PORT"]) for e in pairs] == [
               ("0,1", "1,2,1", "8476"), ("2,3", "1,2,1", "8477")]
  whole = _envs(_tpu_host(), devices_per_worker=4)
  assert [(e["TPU_VISIBLE_CHIPS"], e["TPU_CHIPS_PER_PROCESS_BOUNDS"])
          for e in whole] == [("0,1,2,3", "2,2,1")]
  # v5e/v6e hosts show their chips as /dev/vfio/<group>.
  vfio = worker_devices.HostView(environ={}, jax_platforms=frozenset({"tpu"}),
                                 vfio=["0", "1", "2", "3", "vfio"])
  assert worker_devices.find_devices(vfio).describe() == (
      "4 TPU chips found (/dev/vfio/*)")


def test_cpu_host_is_unchanged():
  for host in (
      worker_devices.HostView(environ={}),
      # GPUs JAX cannot use (no jax[cuda]) or was told not to use.
      worker_devices.HostView(environ={"CUDA_VISIBLE_DEVICES": "0,1"}),
      _gpu_host(environ={"JAX_PLATFORMS": "cpu"}),
      worker_devices.HostView(environ={}, accel=["/dev/accel0"])):
    assert worker_devices.find_devices(host).platform == worker_devices.CPU
    assert _envs(host) == [{}]
    assert _envs(host, parallel=3) == [{}, {}, {}]
    assert _envs(host, parallel=2, share=True) == [{}, {}]
  assert _envs(_gpu_host(environ={"JAX_PLATFORMS": "cuda,cpu"}), parallel=2) == [
      {"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]


def test_workers_sharing_gpus_split_the_preallocated_memory():
  envs = _envs(_gpu_host(count=2), parallel=3, share=True)
  assert envs == [
      {"CUDA_VISIBLE_DEVICES": "0", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.375"},
      {"CUDA_VISIBLE_DEVICES": "1"},
      {"CUDA_VISIBLE_DEVICES": "0", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.375"}]
  assert {e["XLA_PYTHON_CLIENT_MEM_FRACTION"]
          for e in _envs(_gpu_host(), parallel=32, share=True)} == {"0.187"}
  # The user's memory setting wins.
  host = _gpu_host(count=1, environ={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
  assert _envs(host, parallel=2, share=True) == [
      {"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "0"}]


def test_refusals_name_the_flags_the_devices_found_and_what_is_allowed():
  message = _refusal(_gpu_host(count=2), parallel=3)
  assert message.startswith("--parallel=3 asks for more study workers")
  for part in ("2 GPUs found (nvidia-smi -L)", "--devices_per_worker=1",
               "--parallel=2 or less", "--share_devices"):
    assert part in message, message
  message = _refusal(_gpu_host(), devices_per_worker=3)
  assert message == (
      "--devices_per_worker=3 does not split the 8 GPUs found (nvidia-smi -L) "
      "into equal groups: use --devices_per_worker=1, 2, 4 or 8")
  message = _refusal(_gpu_host(), parallel=5, devices_per_worker=2)
  assert "--parallel=4 or less" in message
  assert "a smaller --devices_per_worker" in message
  # TPU chips cannot be shared, and a process owns a box of them.
  message = _refusal(_tpu_host(), parallel=5, share=True)
  assert "4 TPU chips found (/dev/accel*)" in message
  assert "cannot be shared" in message and "--share_devices" not in message
  six = _tpu_host(environ={"TPU_VISIBLE_CHIPS": "0,1,2,3,4,5"})
  message = _refusal(six, devices_per_worker=3)
  assert "6 TPU chips found (TPU_VISIBLE_CHIPS=0,1,2,3,4,5)" in message
  assert "a TPU process owns 1, 2, 4 or 8 chips" in message
  assert message.endswith("use --devices_per_worker=1 or 2")
  message = _refusal(worker_devices.HostView(environ={}), devices_per_worker=1)
  assert message.startswith("--devices_per_worker=1 divides GPUs or TPU chips")
  assert "0 found" in message


def test_the_launcher_counts_devices_without_starting_jax():
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  before = xla_bridge.backends_are_initialized()
  host = worker_devices.read_host({"CUDA_VISIBLE_DEVICES": "0"})
  assert host.environ == {"CUDA_VISIBLE_DEVICES": "0"}
  assert host.nvidia_smi is None  # Not run: the variable names the GPUs.
  assert xla_bridge.backends_are_initialized() == before


def test_each_worker_gets_and_logs_its_own_devices(tmp_path):
  probe = [sys.executable, "-c",
           "import os; print('sees', os.environ['CUDA_VISIBLE_DEVICES'], "
           "os.environ['KEPT'])"]
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="4,5", KEPT="yes")
  codes = study_runner.run_workers(
      probe, 2, log_dir=str(tmp_path), env=env, poll_seconds=0.05,
      worker_env=[{"CUDA_VISIBLE_DEVICES": "4"}, {"CUDA_VISIBLE_DEVICES": "5"}])
  assert codes == [0, 0]
  for i, gpu in enumerate("45"):
    log = (tmp_path / f"worker-{i}.log").read_text()
    assert f" launch: CUDA_VISIBLE_DEVICES={gpu} {sys.executable} -c " in log
    assert f"sees {gpu} yes" in log
  with pytest.raises(ValueError, match="1 worker environments for 2 workers"):
    study_runner.run_workers(probe, 2, log_dir=str(tmp_path),
                             worker_env=[{}])


cpu_host_only = pytest.mark.skipif(
    worker_devices.find_devices(worker_devices.read_host()).platform
    != worker_devices.CPU, reason="JAX has GPUs or TPU chips on this host")


def _planned_studies(tmp_path):
  """A planned two-trial study, its records removed again."""
  study_dir = tmp_path / "study"
  test_sweep._sweep(study_dir, "--num_trials=2", fake=False)
  os.remove(study_dir / "results.csv")
  os.remove(tmp_path / "studies.csv")
  return [study_lib.load_study(str(study_dir))]


@pytest.fixture
def restore_sigterm():
  handler = signal.getsignal(signal.SIGTERM)
  yield
  signal.signal(signal.SIGTERM, handler)


def test_a_launch_on_an_eight_gpu_host_starts_a_worker_per_gpu(
    tmp_path, monkeypatch, restore_sigterm):  # pylint: disable=unused-argument
  studies = _planned_studies(tmp_path)
  started = []
  monkeypatch.setattr(study_launch.worker_devices, "read_host",
                      lambda: _gpu_host())
  monkeypatch.setattr(
      study_launch.study_runner, "run_workers",
      lambda argv, count, **kwargs: started.append((count, kwargs["worker_env"])))
  table = str(tmp_path / "studies.csv")
  study_launch.launch(studies, study_launch.LaunchOptions(
      table=table, command="sweep", run=True, worker=True))
  assert started == [(8, [{"CUDA_VISIBLE_DEVICES": str(i)} for i in range(8)])]
  # Too many workers: refused before any record is written.
  os.remove(tmp_path / "study" / "results.csv")
  os.remove(table)
  with pytest.raises(study_launch.LaunchError, match="--parallel=9 asks"):
    study_launch.launch(studies, study_launch.LaunchOptions(
        table=table, command="sweep", run=True, parallel=9))
  assert not os.path.exists(tmp_path / "study" / "results.csv")
  assert not os.path.exists(table)
  assert len(started) == 1


@cpu_host_only
def test_device_flags_are_refused_where_they_cannot_apply(tmp_path):
  # On this CPU host: before the study's results or tracking row are written.
  result = test_sweep._sweep(tmp_path / "cpu", "--num_trials=2", "--run",
                             "--devices_per_worker=2", fake=False,
                             expect_ok=False)
  assert result.returncode == 2
  assert "Error: --devices_per_worker=2 divides GPUs or TPU chips" in result.stderr
  assert not os.path.exists(tmp_path / "cpu" / "results.csv")
  assert not os.path.exists(tmp_path / "studies.csv")
  # One process per trial: no study worker to give devices to.
  result = test_sweep._sweep(tmp_path / "process", "--num_trials=2", "--run",
                             "--share_devices", expect_ok=False)
  assert result.returncode == 2
  assert "--share_devices" in result.stderr
  assert "--trainer_module=fake_trainer" in result.stderr


@pytest.mark.slow
@cpu_host_only
def test_cpu_launch_runs_parallel_workers_that_see_every_device(tmp_path):
  study_dir = tmp_path / "study"
  # XLA's backend optimisations off: nothing here compares the trials' results.
  env = test_sweep._env(
      XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {helpers.FAST_COMPILE}")
  for name in GPU_VARIABLES + TPU_VARIABLES + ("JAX_PLATFORMS",):
    env.pop(name, None)
  test_sweep._sweep(study_dir, "--num_trials=2", "--run", "--parallel=2",
                    fake=False, env=env)
  rows = test_sweep._read_csv(study_dir / "results.csv")
  assert [r["status"] for r in rows] == ["completed"] * 2
  for i in range(2):
    log = (study_dir / "workers" / f"worker-{i}.log").read_text()
    launch = [line for line in log.splitlines() if " launch: " in line]
    assert len(launch) == 1
    # No visible-device variable: the command follows `launch:` directly.
    assert launch[0].split(" launch: ")[1].startswith(
        f"{sys.executable} -m tuning_playbook.study_worker"), launch[0]
