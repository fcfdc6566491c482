"""Bad input fails before any compilation, names the key, and touches nothing."""

import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import pytest

from tests import analysis_fixtures
from tests import helpers
from tuning_playbook.common import config_validation
from tuning_playbook import config_schema
from tuning_playbook.training import train
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
    config_validation.validate(config)


@pytest.mark.parametrize("key,value", [
    ("optimizer.momentum", 1.0), ("optimizer.learning_rate", float("nan")),
    ("optimizer.warmup_steps", 10**6), ("batch_norm.policy", "sync"),
    ("seed", -1), ("num_best_checkpoints", 0), ("best_mode", "lowest"),
])
def test_bad_values_name_their_key(key, value):
  config = helpers.load_config(**{key: value})
  with pytest.raises(config_schema.ConfigError, match=rf"config\.{key}="):
    config_validation.validate(config)


def test_ghost_batch_norm_needs_a_dividing_virtual_batch():
  config = helpers.load_config(**{"batch_norm.policy": "ghost",
                                  "batch_norm.virtual_batch_size": 5})
  with pytest.raises(config_schema.ConfigError,
                     match=r"config\.batch_norm\.virtual_batch_size=5"):
    config_validation.validate(config)


def test_a_bad_config_value_exits_before_the_trainer_is_imported(tmp_path):
  # The CLI as `python -m tuning_playbook.main`, reporting at exit whether
  # TensorFlow, Orbax or the trainer had been imported.
  code = ("import runpy, sys\n"
          "try:\n"
          "  runpy.run_module('tuning_playbook.main', run_name='__main__')\n"
          "finally:\n"
          "  print(sorted(m for m in ('tensorflow', 'orbax.checkpoint', "
          "'tuning_playbook.training.train') if m in sys.modules))\n")
  for override, expected in [
      ("--config.optimizer.name=adamw", "config.optimizer.name='adamw' is invalid"),
      ("--config.workload=no_such_workload", "no module workloads.no_such_workload")]:
    argv = helpers.main_command(str(tmp_path / "run"), override)
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
  result = subprocess.run(
      [sys.executable, "-m", "tuning_playbook.sweep", "--config=configs/mnist1d_cnn.py",
       f"--study_dir={tmp_path / 'study'}", "--num_trials=2", "--seed=0",
       "--config.nope=1"], cwd=helpers.REPO, env=helpers.subprocess_env(),
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert "nope" in result.stderr and "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "study")


def _files(directory):
  """{relative path: bytes} of every file below `directory`."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


def _run_module(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=helpers.REPO,
                        env=helpers.subprocess_env(), capture_output=True,
                        text=True, timeout=120)


@pytest.fixture(scope="module")
def analysis_study(tmp_path_factory):
  """A finished synthetic study (no training): study.json and 10 trials."""
  return analysis_fixtures.clean_study(str(tmp_path_factory.mktemp("analysis") / "study"))


ANALYZE_BAD_INPUT = [  # (case, flags, what stderr says)
    ("missing", ("--study_dir={missing}",),
     ["{missing} is not a directory", "one holding study.json"]),
    ("no study.json", ("--study_dir={tmp}",), ["no study.json in {tmp}"]),
    ("corrupt study.json", ("--study_dir={study}",),
     ["{study}/study.json, line 1: not readable as JSON (Expecting value, column 10)",
      "the JSON object that tuning_playbook.sweep (or .playbook) writes"]),
    ("study.json a list", ("--study_dir={study}",),
     ["{study}/study.json: holds a list, not a JSON object"]),
    ("unknown flag", ("--study_dir={study}", "--top_kk=3"),
     ["Unknown command line flag 'top_kk'", "Did you mean: top_k"]),
    ("top_k of 0", ("--study_dir={study}", "--top_k=0"),
     ["--top_k=0: 0 is not a positive integer"]),
    ("top_k not a number", ("--study_dir={study}", "--top_k=abc"), ["--top_k=abc"]),
    ("no study_dir", (), ["Exactly one of (study_dir, tracking_table) must have a value"]),
]


@pytest.mark.parametrize("case,args,expected", ANALYZE_BAD_INPUT,
                         ids=[c[0] for c in ANALYZE_BAD_INPUT])
def test_analyze_refuses_bad_input_and_changes_nothing(tmp_path, analysis_study, case,
                                                        args, expected):
  study = str(tmp_path / "study")
  shutil.copytree(analysis_study, study)
  if case == "corrupt study.json":
    with open(os.path.join(study, "study.json"), "w") as f:
      f.write('{"name": ')
  if case == "study.json a list":
    with open(os.path.join(study, "study.json"), "w") as f:
      f.write("[1, 2]")
  names = {"missing": str(tmp_path / "nope"), "tmp": str(tmp_path / "empty"),
           "study": study}
  os.makedirs(names["tmp"])
  before = _files(tmp_path)
  result = _run_module("tuning_playbook.analyze", *(a.format(**names) for a in args))
  assert result.returncode == 2, (case, result.stderr[-2000:])
  for text in expected:
    assert text.format(**names) in result.stderr, (case, result.stderr[-2000:])
  assert "Traceback" not in result.stderr
  assert _files(tmp_path) == before  # No report, nothing rewritten.
  assert not os.path.exists(os.path.join(study, "report"))


def test_analyze_names_a_torn_log_line_and_leaves_the_log_as_it_is(
    tmp_path, analysis_study):
  # A trial's logs are appended while it trains (a kill may tear a line):
  # the analysis uses what it can read, names what it cannot, and writes
  # only its report.
  study = str(tmp_path / "study")
  shutil.copytree(analysis_study, study)
  metrics = os.path.join(study, "trials", "0001", "metrics.jsonl")
  with open(metrics) as f:
    lines = f.readlines()
  lines[2] = "not json\n"
  with open(metrics, "w") as f:
    f.writelines(lines)
  before = _files(study)
  result = _run_module("tuning_playbook.analyze", f"--study_dir={study}")
  assert result.returncode == 0, result.stderr[-2000:]
  with open(os.path.join(study, "report", "findings.json")) as f:
    found = {x["id"]: x for x in json.load(f)["findings"]}
  problems = found["record_problems"]
  assert ("0001: metrics.jsonl: unreadable line 3 skipped (line 3: 'not json')"
          in problems["message"])
  after = _files(study)
  assert {k: v for k, v in after.items() if not k.startswith("report")} == before


DAMAGED_RECORDS = [  # (file of trial 0002, content, what stderr says)
    ("summary.json", '{"status": \n',
     "summary.json, line 2: not readable as JSON (Expecting value, column 1)"),
    ("config.json", "[1]", "config.json: holds a list, not a JSON object"),
    ("runner.json", "\xff", "runner.json, line 1: not UTF-8 text"),
]


@pytest.mark.parametrize("name,content,expected", DAMAGED_RECORDS,
                         ids=[c[0] for c in DAMAGED_RECORDS])
def test_analyze_refuses_a_damaged_record_naming_file_and_line(
    tmp_path, analysis_study, name, content, expected):
  # Records written whole (never torn by a kill): damage is bad input.
  study = str(tmp_path / "study")
  shutil.copytree(analysis_study, study)
  path = os.path.join(study, "trials", "0002", name)
  with open(path, "wb") as f:
    f.write(content.encode("latin-1"))
  before = _files(tmp_path)
  result = _run_module("tuning_playbook.analyze", f"--study_dir={study}")
  assert result.returncode == 2, result.stderr[-2000:]
  assert f"Error: {os.path.join(study, 'trials', '0002', expected)}" in result.stderr
  assert "Traceback" not in result.stderr
  assert _files(tmp_path) == before
  assert not os.path.exists(os.path.join(study, "report"))


@pytest.fixture(scope="module")
def sweep_study(tmp_path_factory):
  """A planned study of tests/configs/tiny_study.py: study.json, 2 trial configs."""
  study = str(tmp_path_factory.mktemp("sweep") / "study")
  result = _run_module("tuning_playbook.sweep", "--config=tests/configs/tiny_study.py",
                       f"--study_dir={study}", "--num_trials=2", "--seed=0")
  assert result.returncode == 0, result.stderr[-2000:]
  return study


WORKER_BAD_INPUT = [  # (case, flags, what stderr says)
    ("missing", ("--study_dir={missing}",),
     ["{missing} is not a directory", "one holding study.json"]),
    ("no study.json", ("--study_dir={tmp}",), ["no study.json in {tmp}"]),
    ("no study_dir", (), ["--study_dir must have a value"]),
    ("corrupt study.json", ("--study_dir={study}",),
     ["{study}/study.json, line 1: not readable as JSON (Expecting value, column 10)",
      "the JSON object that tuning_playbook.sweep (or .playbook) writes"]),
    ("incomplete study.json", ("--study_dir={study}",),
     ["{study}/study.json: a bad or missing key 'description'", "base_config"]),
    ("unknown workload", ("--study_dir={study}", "--config.workload=nope"),
     ["config.workload='nope': no module workloads.nope; available: "]),
    ("bad value", ("--study_dir={study}", "--config.batch_size=-3"),
     ["config.batch_size=-3 is invalid: must be a positive integer"]),
    ("unknown key", ("--study_dir={study}", "--config.optimizer.nme=adam"),
     ["--config.optimizer.nme: the config has no key 'nme' "
      '(Did you mean "name" instead of "nme"?)']),
    ("another config", ("--study_dir={study}", "--config.batch_size=64"),
     ["differ from the config of every trial", "batch_size: 32 -> 64",
      "Launch the worker with the study's --config and --config.* flags"]),
]


@pytest.mark.parametrize("case,args,expected", WORKER_BAD_INPUT,
                         ids=[c[0] for c in WORKER_BAD_INPUT])
def test_study_worker_refuses_bad_input_and_claims_nothing(tmp_path, sweep_study, case,
                                                           args, expected):
  study = str(tmp_path / "study")
  shutil.copytree(sweep_study, study)
  if case == "corrupt study.json":
    with open(os.path.join(study, "study.json"), "w") as f:
      f.write('{"name": ')
  if case == "incomplete study.json":
    with open(os.path.join(study, "study.json"), "w") as f:
      f.write('{"name": "tiny"}')
  names = {"missing": str(tmp_path / "nope"), "tmp": str(tmp_path / "empty"),
           "study": study}
  os.makedirs(names["tmp"])
  before = _files(tmp_path)
  result = _run_module("tuning_playbook.study_worker", "--config=tests/configs/tiny_study.py",
                       *(a.format(**names) for a in args))
  assert result.returncode == 2, (case, result.stderr[-2000:])
  for text in expected:
    assert text.format(**names) in result.stderr, (case, result.stderr[-2000:])
  assert "Traceback" not in result.stderr
  # No trial claimed, logged or recorded failed.
  assert _files(tmp_path) == before
