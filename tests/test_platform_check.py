"""The platform line at the start of a run, and the accelerator requirement."""

import logging
import os
import subprocess

import jax
import pytest

from tests import helpers
from tuning_playbook.common import platform_check
from tuning_playbook import config_schema

def test_describe_names_platform_devices_and_versions():
  line = platform_check.describe()
  assert line.startswith(
      f"JAX platform: cpu, {jax.device_count()} devices (process 0 of 1, ")
  assert str(jax.local_devices()[0]) in line
  assert f"jax {jax.__version__}, jaxlib " in line


def test_required_accelerator_on_cpu_raises_with_the_install_line():
  with pytest.raises(platform_check.NoAcceleratorError) as e:
    platform_check.check_platform(True, "--require_accelerator")
  message = str(e.value)
  assert message.startswith("--require_accelerator is set, but JAX found no GPU or "
                            "TPU: it runs on cpu (")
  assert "pip install -e '.[cuda12]'" in message
  assert "pip install -e '.[tpu]'" in message


def test_not_required_returns_the_line():
  assert platform_check.check_platform(False, "x").startswith("JAX platform: cpu")


def test_hardware_that_jax_missed_is_named(tmp_path, monkeypatch):
  gpu = tmp_path / "nvidia0"
  gpu.touch()
  monkeypatch.setattr(platform_check, "_HARDWARE_FILES",
                      ((str(gpu), "an NVIDIA GPU"), (str(tmp_path / "accel0"), "a TPU")))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert platform_check.hardware_present() == [f"an NVIDIA GPU ({gpu})"]
  with pytest.raises(platform_check.NoAcceleratorError,
                     match=r"this machine shows an NVIDIA GPU .* that JAX did not "
                     r"use; JAX_PLATFORMS=cpu is set\. To train on one"):
    platform_check.check_platform(True, "config.require_accelerator")


def test_unused_hardware_is_a_warning_when_not_required(tmp_path, monkeypatch, caplog):
  gpu = tmp_path / "nvidia0"
  gpu.touch()
  monkeypatch.setattr(platform_check, "_HARDWARE_FILES", ((str(gpu), "an NVIDIA GPU"),))
  with caplog.at_level(logging.WARNING):
    platform_check.check_platform(False, "x")
  assert any(r.levelno == logging.WARNING and "Training on the CPU: this machine shows "
             f"an NVIDIA GPU ({gpu})" in r.getMessage() for r in caplog.records)


def test_the_key_defaults_to_off():
  assert config_schema.base_config().require_accelerator is False


def _main(workdir: str, *args: str) -> subprocess.CompletedProcess:
  env = helpers.subprocess_env(2)
  env["JAX_LOG_COMPILES"] = "1"
  env.pop("JAX_PLATFORMS", None)
  return subprocess.run(helpers.main_command(workdir, *args),
                        cwd=helpers.REPO, env=env, capture_output=True, text=True,
                        timeout=120)


@pytest.mark.parametrize("arg,named", [
    ("--require_accelerator", "--require_accelerator is set"),
    ("--config.require_accelerator=True", "config.require_accelerator is set"),
])
def test_main_exits_2_before_compiling_or_writing(tmp_path, arg, named):
  workdir = str(tmp_path / "run")
  result = _main(workdir, arg)
  assert result.returncode == 2, result.stderr
  assert f"Error: {named}, but JAX found no GPU or TPU: it runs on cpu (2 devices" \
      in result.stderr
  assert "pip install -e '.[cuda12]'" in result.stderr
  assert "Traceback" not in result.stderr
  assert "Compiling" not in result.stderr
  assert not os.path.exists(workdir)


def test_a_run_logs_its_platform(tmp_path):
  result = _main(str(tmp_path / "run"), "--config.max_train_steps=2",
                 "--config.optimizer.warmup_steps=0", "--config.eval_every_steps=2",
                 "--config.log_every_steps=1")
  assert result.returncode == 0, result.stderr
  assert "JAX platform: cpu, 2 devices (process 0 of 1, 2 local: " in result.stderr
  assert f"jax {jax.__version__}, jaxlib " in result.stderr
