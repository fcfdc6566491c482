"""Bad input fails before any compilation, names the key, and touches nothing."""

import os

import jax
import ml_collections
import pytest

from tests import helpers
from tuning_playbook import config_schema
from tuning_playbook import train
from tuning_playbook import workload as workload_lib


@pytest.mark.parametrize("override,expected", [
    ("--config.workload=no_such_workload",
     "config.workload='no_such_workload': no module workloads.no_such_workload; "
     "available: "),
    ("--config.optimizer.name=adamw",
     "config.optimizer.name='adamw' is invalid: allowed: sgd, momentum, nesterov, "
     "rmsprop, adam, nadam"),
    ("--config.batch_size=0", "config.batch_size=0 is invalid: must be a positive integer"),
    ("--config.batch_size=-8", "config.batch_size=-8 is invalid: must be a positive integer"),
    ("--config.batch_size=18",
     "config.batch_size=18 is invalid: the global batch must be divisible by the "
     "device count (4)"),
    ("--config.max_train_steps=0",
     "config.max_train_steps=0 is invalid: must be a positive integer"),
    ("--config.optimzer.name=adam", 'Did you mean "optimizer" instead of "optimzer"?'),
    ("--config.optimizer.schedule=step", "config.optimizer.schedule='step' is invalid: "
     "allowed: constant, linear, cosine"),
    ("--config.best_metric=eval/valid/error_rate", "config.best_metric="),
    ("--config.eval_batch_size=8", "must be 0 or at least batch_size (16)"),
])
def test_cli_rejects_bad_config_before_compiling(tmp_path, override, expected):
  workdir = str(tmp_path / "run")
  env = helpers.subprocess_env(4)
  env["JAX_LOG_COMPILES"] = "1"
  import subprocess  # pylint: disable=g-import-not-at-top
  result = subprocess.run(helpers.main_command(workdir, override), cwd=helpers.REPO,
                          env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert expected in result.stderr
  assert "Traceback" not in result.stderr
  assert "Compiling" not in result.stderr
  assert not os.path.exists(workdir)


def test_missing_config_file_is_named(tmp_path):
  missing = str(tmp_path / "configs" / "nope.py")
  result = helpers.run_main(str(tmp_path / "run"), config=missing)
  assert result.returncode == 2
  assert f"[Errno 2] No such file or directory: '{missing}'" in result.stderr
  assert "Traceback" not in result.stderr


def test_unknown_key_in_a_config_file_is_named():
  config = helpers.load_config()
  with config.unlocked():
    config.optimizer.lerning_rate = 0.1
  with pytest.raises(config_schema.ConfigError, match=r"config\.optimizer\.lerning_rate"):
    config_schema.validate(config)


@pytest.mark.parametrize("key,value", [
    ("optimizer.momentum", 1.0), ("optimizer.learning_rate", float("nan")),
    ("optimizer.warmup_steps", 10**6), ("batch_norm.policy", "sync"),
    ("seed", -1), ("num_best_checkpoints", 0), ("best_mode", "lowest"),
])
def test_bad_values_name_their_key(key, value):
  config = helpers.load_config(**{key: value})
  with pytest.raises(config_schema.ConfigError, match=rf"config\.{key}="):
    config_schema.validate(config)


def test_ghost_batch_norm_needs_a_dividing_virtual_batch():
  config = helpers.load_config(**{"batch_norm.policy": "ghost",
                                  "batch_norm.virtual_batch_size": 5})
  with pytest.raises(config_schema.ConfigError,
                     match=r"config\.batch_norm\.virtual_batch_size=5"):
    config_schema.validate(config)


def test_a_bad_config_value_exits_before_the_trainer_is_imported(tmp_path):
  # The CLI as `python -m tuning_playbook.main`, reporting at exit whether
  # TensorFlow, Orbax or the trainer had been imported.
  code = ("import runpy, sys\n"
          "try:\n"
          "  runpy.run_module('tuning_playbook.main', run_name='__main__')\n"
          "finally:\n"
          "  print(sorted(m for m in ('tensorflow', 'orbax.checkpoint', "
          "'tuning_playbook.train') if m in sys.modules))\n")
  for override, expected in [
      ("--config.optimizer.name=adamw", "config.optimizer.name='adamw' is invalid"),
      ("--config.workload=no_such_workload", "no module workloads.no_such_workload")]:
    argv = helpers.main_command(str(tmp_path / "run"), override)
    import subprocess  # pylint: disable=g-import-not-at-top
    result = subprocess.run([argv[0], "-c", code] + argv[3:], cwd=helpers.REPO,
                            env=helpers.subprocess_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert result.stdout.strip() == "[]"
  assert not os.path.exists(tmp_path / "run")


def test_nothing_is_compiled_before_the_error(monkeypatch, tmp_path):
  def no_jit(*args, **kwargs):
    raise AssertionError("compiled before validating")
  monkeypatch.setattr(jax, "jit", no_jit)
  config = helpers.load_config(**{"workload": "no_such_workload"})
  with pytest.raises(workload_lib.UnknownWorkloadError, match="no_such_workload"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  config = helpers.load_config(**{"batch_size": 6})
  with pytest.raises(config_schema.ConfigError, match="device count"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  config = helpers.load_config(os.path.join(helpers.REPO, "configs", "mnist1d_cnn.py"))
  with config.unlocked():
    config.model.featurs = 32
  with pytest.raises(workload_lib.UnknownModelFieldError,
                     match=r"config\.model\.featurs=32 is invalid: .*allowed: .*features"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_a_model_that_cannot_be_built_is_bad_input_and_claims_nothing(tmp_path):
  workdir = str(tmp_path / "run")
  config = os.path.join(helpers.REPO, "configs", "mnist1d_cnn.py")
  result = helpers.run_main(workdir, "--config.model.features=-3",
                            f"--config.data.data_dir={tmp_path / 'data'}", config=config)
  assert result.returncode == 2, result.stderr[-2000:]
  assert ("config.model.features=-3 is invalid: workload 'mnist1d_cnn' needs an "
          "int > 0") in result.stderr
  assert "Traceback" not in result.stderr
  assert not os.path.exists(os.path.join(workdir, "config.json"))


def test_a_model_field_of_the_wrong_type_is_bad_input(tmp_path):
  config = helpers.load_config(os.path.join(helpers.REPO, "configs", "mnist1d_mlp.py"))
  with config.unlocked():
    config.model = ml_collections.ConfigDict({"width": "wide"})  # No typed default.
  with pytest.raises(workload_lib.ModelConfigError,
                     match=r"config\.model\.width='wide' is invalid: .*expects a int"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_a_defect_in_model_code_is_reported_with_its_traceback(tmp_path):
  workdir = str(tmp_path / "run")
  result = helpers.run_main(workdir, "--config.workload=tests.broken_workload",
                            f"--config.data.data_dir={tmp_path / 'data'}")
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" in result.stderr
  assert "broken_workload.py" in result.stderr
  assert "RuntimeError: defect in BrokenModel.__call__" in result.stderr
  assert "is invalid" not in result.stderr  # Not blamed on the config.


def test_bad_multihost_flags_exit_2(tmp_path):
  result = helpers.run_main(str(tmp_path / "run"), "--coordinator_address=127.0.0.1:1",
                            "--num_processes=2", "--process_id=5")
  assert result.returncode == 2
  assert "--process_id=5 must be in [0, 2)" in result.stderr


def test_sweep_rejects_an_unknown_override_without_traceback(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  result = subprocess.run(
      [sys.executable, "-m", "tuning_playbook.sweep", "--config=configs/mnist1d_cnn.py",
       f"--study_dir={tmp_path / 'study'}", "--num_trials=2", "--seed=0",
       "--config.nope=1"], cwd=helpers.REPO, env=helpers.subprocess_env(),
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert "nope" in result.stderr and "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "study")
