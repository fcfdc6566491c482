"""Tests of the sweep CLI: study files, refusal, extension, running, tracking.

Trials run `tests/fake_trainer.py` (fast, scriptable) except in
test_real_trainer_end_to_end, which trains tuning_playbook.main for real.
"""

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tuning_playbook.analysis import study_data
from tuning_playbook.common import records
from tuning_playbook.studies import code_version
from tuning_playbook.studies import tracking

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TINY = "tests/configs/tiny_study.py"


def _env(**extra):
  path = os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))
  return dict(os.environ, PYTHONPATH=path, **extra)


def _sweep_argv(study_dir, *args, config=TINY, seed=0, fake=True):
  argv = [sys.executable, "-m", "tuning_playbook.sweep", f"--config={config}",
          f"--study_dir={study_dir}", f"--seed={seed}", *args]
  if fake:
    argv.append("--trainer_module=fake_trainer")
  return argv


def _sweep(study_dir, *args, env=None, expect_ok=True, **kwargs):
  result = subprocess.run(_sweep_argv(study_dir, *args, **kwargs), cwd=REPO,
                          env=env or _env(), capture_output=True, text=True,
                          timeout=240)
  if expect_ok:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _starts(trial_dir):
  with open(os.path.join(trial_dir, "starts.jsonl")) as f:
    return [json.loads(line)["start_step"] for line in f]


def _write_config(path, space):
  with open(path, "w") as f:
    f.write(textwrap.dedent(f"""\
        from tuning_playbook import config_schema

        def get_config():
          config = config_schema.base_config()
          config.workload = "mnist1d_mlp"
          config.max_train_steps = 20
          return config

        def get_search_space():
          return {space!r}
        """))
  return str(path)


def test_generates_study_files(tmp_path):
  study_dir = tmp_path / "study"
  _sweep(study_dir, "--num_trials=5", "--config.batch_size=64")
  record = _read_json(study_dir / "study.json")
  assert record["name"] == "tiny" and record["seed"] == 0
  assert record["description"].startswith("Learning rate")
  assert record["search_space"]["optimizer.learning_rate"] == {
      "role": "nuisance", "scale": "log", "min": 1e-3, "max": 1.0}
  assert [t["trial_id"] for t in record["trials"]] == [
      "0000", "0001", "0002", "0003", "0004"]
  for trial in record["trials"]:
    config = _read_json(study_dir / "trials" / trial["trial_id"] /
                        "config.json")
    assert config["batch_size"] == 64
    assert config["optimizer"]["schedule"] == "cosine"
    for key, value in trial["params"].items():
      section, name = key.split(".")
      assert config[section][name] == value
  rows = _read_csv(study_dir / "results.csv")
  assert [r["status"] for r in rows] == ["pending"] * 5
  first = record["trials"][0]["params"]
  assert shlex.split(rows[0]["command"]) == [
      "python", "-m", "fake_trainer", f"--config={TINY}",
      f"--workdir={study_dir}/trials/0000", "--config.batch_size=64",
      "--config.optimizer.schedule=cosine",
      f"--config.optimizer.learning_rate={first['optimizer.learning_rate']!r}",
      f"--config.optimizer.momentum={first['optimizer.momentum']!r}",
      f"--config.optimizer.warmup_steps={first['optimizer.warmup_steps']}"]
  assert float(rows[0]["optimizer.learning_rate"]) == first[
      "optimizer.learning_rate"]
  table = _read_csv(tmp_path / "studies.csv")
  assert len(table) == 1 and table[0]["study"] == "tiny"
  assert table[0]["num_trials"] == "5" and table[0]["best_value"] == ""
  assert "--num_trials=5 --seed=0 --config.batch_size=64" in table[0][
      "command"]
  # What ran it: this checkout's commit (when it is one) and the framework.
  assert table[0]["code_version"] == code_version.describe(os.path.join(REPO, TINY))
  assert table[0]["code_version"].endswith(code_version.framework_version() + ")") or (
      table[0]["code_version"] == code_version.framework_version())


def test_print_commands_gives_one_runnable_command_per_trial(tmp_path):
  study_dir = tmp_path / "study"
  out = _sweep(study_dir, "--num_trials=3", "--print_commands").stdout
  lines = out.strip().splitlines()
  assert len(lines) == 3
  rows = _read_csv(study_dir / "results.csv")
  assert lines == [r["command"] for r in rows]
  # A printed command, run as a cluster job would, trains its trial.
  argv = shlex.split(lines[1])
  subprocess.run([sys.executable] + argv[1:], cwd=REPO, env=_env(),
                 check=True, capture_output=True, timeout=60)
  _sweep(study_dir, "--num_trials=3")  # Refreshes results.csv.
  statuses = [r["status"] for r in _read_csv(study_dir / "results.csv")]
  assert statuses == ["pending", "completed", "pending"]


def test_default_sized_study_generates_64_trials(tmp_path):
  config = tmp_path / "default_study.py"
  config.write_text(textwrap.dedent("""\
      from tuning_playbook import config_schema
      from tuning_playbook import study_presets

      def get_config():
        config = config_schema.base_config()
        config.workload = "mnist1d_cnn"
        return config

      def get_search_space():
        return study_presets.default_search_space(get_config())
      """))
  study_dir = tmp_path / "study"
  _sweep(study_dir, "--num_trials=64", config=str(config))
  record = _read_json(study_dir / "study.json")
  ids = [f"{i:04d}" for i in range(64)]
  assert [t["trial_id"] for t in record["trials"]] == ids
  assert sorted(os.listdir(study_dir / "trials")) == ids
  assert len({json.dumps(t["params"], sort_keys=True)
              for t in record["trials"]}) == 64
  for trial in record["trials"]:
    assert set(trial["params"]) == set(record["search_space"])
    config = _read_json(study_dir / "trials" / trial["trial_id"] /
                        "config.json")
    for key, value in trial["params"].items():
      section, name = key.split(".")
      assert config[section][name] == value
  rows = _read_csv(study_dir / "results.csv")
  assert [r["status"] for r in rows] == ["pending"] * 64


def test_unknown_key_is_refused_before_writing(tmp_path):
  config = _write_config(tmp_path / "bad.py", {"nuisance": {
      "optimizer.learning_rte": {"scale": "log", "min": 1e-3, "max": 1.0}}})
  result = _sweep(tmp_path / "study", "--num_trials=4", config=config,
                  expect_ok=False)
  assert result.returncode != 0
  assert "optimizer.learning_rte" in result.stderr
  assert not (tmp_path / "study").exists()
  assert not (tmp_path / "studies.csv").exists()


def test_invalid_trial_value_is_refused_before_writing(tmp_path):
  config = _write_config(tmp_path / "bad.py", {"nuisance": {
      "optimizer.warmup_steps": {"scale": "int_linear", "min": 0,
                                 "max": 50}}})
  result = _sweep(tmp_path / "study", "--num_trials=8", config=config,
                  expect_ok=False)
  assert "optimizer.warmup_steps" in result.stderr
  assert "max_train_steps=20" in result.stderr
  assert not (tmp_path / "study").exists()


def test_search_space_follows_the_overrides_of_the_sweep(tmp_path):
  study_dir = tmp_path / "study"
  args = ("--num_trials=8", "--config.max_train_steps=300", "--print_commands")
  out = _sweep(study_dir, *args, config="configs/mnist1d_cnn.py",
               fake=False).stdout
  record = _read_json(study_dir / "study.json")
  # Warmup spans 0 to 10% of the overridden training length, not of 3800.
  assert record["search_space"]["optimizer.warmup_steps"] == {
      "role": "nuisance", "scale": "int_linear", "min": 0, "max": 30}
  assert record["base_config"]["max_train_steps"] == 300
  assert record["config_overrides"] == {"max_train_steps": 300}
  warmups = [t["params"]["optimizer.warmup_steps"] for t in record["trials"]]
  assert all(0 <= w <= 30 for w in warmups) and len(set(warmups)) == 8
  rows = _read_csv(study_dir / "results.csv")
  assert out.strip().splitlines() == [r["command"] for r in rows]
  for trial, row in zip(record["trials"], rows):
    config = _read_json(study_dir / "trials" / trial["trial_id"] /
                        "config.json")
    assert config["max_train_steps"] == 300
    assert config["optimizer"]["warmup_steps"] == trial["params"][
        "optimizer.warmup_steps"]
    assert "--config.max_train_steps=300" in shlex.split(row["command"])
  before = (study_dir / "study.json").read_bytes()

  # The same overrides resume the study; changed ones are refused, listed.
  _sweep(study_dir, *args, config="configs/mnist1d_cnn.py", fake=False)
  assert (study_dir / "study.json").read_bytes() == before
  result = _sweep(study_dir, "--num_trials=8", "--config.max_train_steps=400",
                  config="configs/mnist1d_cnn.py", fake=False,
                  expect_ok=False)
  assert result.returncode == 2
  for difference in ("config_overrides.max_train_steps: 300 -> 400",
                     "base_config.max_train_steps: 300 -> 400",
                     "search_space.optimizer.warmup_steps"):
    assert difference in result.stderr
  assert (study_dir / "study.json").read_bytes() == before


def test_adam_study_tunes_what_its_budget_allows(tmp_path):
  _sweep(tmp_path / "s16", "--num_trials=16", config="configs/mnist1d_mlp.py",
         fake=False)
  space = _read_json(tmp_path / "s16" / "study.json")["search_space"]
  assert list(space) == ["optimizer.learning_rate", "optimizer.beta1",
                         "optimizer.warmup_steps", "optimizer.weight_decay"]
  assert space["optimizer.warmup_steps"]["max"] == 600
  # A larger budget would tune epsilon too: refused, saying why.
  result = _sweep(tmp_path / "s16", "--num_trials=32",
                  config="configs/mnist1d_mlp.py", fake=False,
                  expect_ok=False)
  assert result.returncode == 2
  assert "search_space.optimizer.epsilon: '<absent>'" in result.stderr
  assert "16 trials recorded, num_trials=32 asked" in result.stderr


def test_searching_max_train_steps_is_refused_and_keeps_the_study(tmp_path):
  study_dir = tmp_path / "study"
  _sweep(study_dir, "--num_trials=3")
  before = (study_dir / "study.json").read_bytes()
  trials = sorted(os.listdir(study_dir / "trials"))
  config = _write_config(tmp_path / "length.py", {"nuisance": {
      "max_train_steps": {"scale": "int_log", "min": 10, "max": 40}}})
  for directory in (study_dir, tmp_path / "fresh"):
    result = _sweep(directory, "--num_trials=4", config=config,
                    expect_ok=False)
    assert result.returncode == 2
    assert "nuisance.max_train_steps" in result.stderr
    assert ('"Never tune the `max_train_steps` number in a study. Pick a '
            'value and use it for all trials."') in result.stderr
    assert "Traceback" not in result.stderr
  assert (study_dir / "study.json").read_bytes() == before
  assert sorted(os.listdir(study_dir / "trials")) == trials
  assert not (tmp_path / "fresh").exists()


def test_changed_definition_is_refused_and_extension_keeps_trials(tmp_path):
  study_dir = tmp_path / "study"
  _sweep(study_dir, "--num_trials=4")
  before = _read_json(study_dir / "study.json")
  config_path = study_dir / "trials" / "0001" / "config.json"
  mtime = os.stat(config_path).st_mtime_ns

  result = _sweep(study_dir, "--num_trials=4", seed=1, expect_ok=False)
  assert result.returncode != 0 and "seed: 0 -> 1" in result.stderr
  result = _sweep(study_dir, "--num_trials=4", "--config.max_train_steps=30",
                  expect_ok=False)
  assert "config_overrides.max_train_steps" in result.stderr
  other = _write_config(tmp_path / "other.py", {"nuisance": {
      "optimizer.learning_rate": {"scale": "log", "min": 1e-4, "max": 1.0}}})
  result = _sweep(study_dir, "--num_trials=4", config=other, expect_ok=False)
  assert "search_space.optimizer.learning_rate" in result.stderr
  assert _read_json(study_dir / "study.json") == before

  # A study recorded before a base-config key existed: the same study.
  older = dict(before, base_config={k: v for k, v in before["base_config"].items()
                                    if k != "data.on_device_max_mb"})
  assert len(older["base_config"]) == len(before["base_config"]) - 1
  with open(study_dir / "study.json", "w") as f:
    json.dump(older, f)
  _sweep(study_dir, "--num_trials=10")
  after = _read_json(study_dir / "study.json")
  assert after["trials"][:4] == before["trials"]
  assert len(after["trials"]) == 10
  assert os.stat(config_path).st_mtime_ns == mtime
  # The extended study equals one generated at 10 trials from the start.
  _sweep(tmp_path / "fresh", "--num_trials=10")
  assert _read_json(tmp_path / "fresh" / "study.json")["trials"] == after[
      "trials"]


def test_infeasible_trials_are_recorded_and_never_stop_the_study(tmp_path):
  study_dir = tmp_path / "study"
  env = _env(FAKE_TRAINER_DIVERGE_ABOVE="0.2", FAKE_TRAINER_FAIL_ABOVE="0.5")
  _sweep(study_dir, "--num_trials=8", "--run", "--parallel=2", env=env)
  trials = _read_json(study_dir / "study.json")["trials"]
  rows = {r["trial_id"]: r for r in _read_csv(study_dir / "results.csv")}
  expected = {}
  for t in trials:
    lr = t["params"]["optimizer.learning_rate"]
    expected[t["trial_id"]] = ("failed" if lr > 0.5 else
                               "diverged" if lr > 0.2 else "completed")
  assert {k: r["status"] for k, r in rows.items()} == expected
  assert set(expected.values()) == {"failed", "diverged", "completed"}
  for trial_id, status in expected.items():
    reason = rows[trial_id]["reason"]
    if status == "failed":
      assert reason.startswith("exited with code 1")
      assert "fake failure to start" in reason
    elif status == "diverged":
      assert reason == "train/loss is NaN at step 2"
    else:
      assert reason == "" and float(rows[trial_id]["best_value"]) > 0
  table = _read_csv(tmp_path / "studies.csv")[0]
  completed = [r for r in rows.values() if r["status"] == "completed"]
  best = min(completed, key=lambda r: float(r["best_value"]))
  assert table["best_trial"] == best["trial_id"]
  assert float(table["best_value"]) == float(best["best_value"])
  assert int(table["num_infeasible"]) == len(rows) - len(completed)
  assert table["num_unfinished"] == "0"
  # The report reads each trial as results.csv and the table do: a trial
  # process that exited without summary.json failed (it is not unfinished).
  analysed = study_data.load_study(str(study_dir))
  assert {t.trial_id: t.status for t in analysed.trials} == expected
  assert {t.trial_id: t.reason for t in analysed.trials} == {
      k: r["reason"] for k, r in rows.items()}
  analyze = subprocess.run(
      [sys.executable, "-m", "tuning_playbook.analyze",
       f"--study_dir={study_dir}"], cwd=REPO, env=env, capture_output=True,
      text=True, timeout=240)
  assert analyze.returncode == 0, analyze.stderr[-3000:]
  findings = _read_json(study_dir / "report" / "findings.json")["findings"]
  assert "unfinished" not in {f["kind"] for f in findings}
  infeasible = [f for f in findings if f["kind"] == "infeasible"]
  assert infeasible and infeasible[0]["details"]["num_infeasible"] == len(
      rows) - len(completed), infeasible

  # Relaunching leaves finished trials alone; --retry_failed reruns failures.
  failed = [k for k, s in expected.items() if s == "failed"]
  diverged = [k for k, s in expected.items() if s == "diverged"]
  _sweep(study_dir, "--num_trials=8", "--run", env=env)
  assert _starts(study_dir / "trials" / failed[0]) == [0]
  _sweep(study_dir, "--num_trials=8", "--run", "--retry_failed", env=env)
  assert _starts(study_dir / "trials" / failed[0]) == [0, 0]
  assert _starts(study_dir / "trials" / diverged[0]) == [0]


def _wait_for(predicate, timeout, what):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return
    time.sleep(0.05)
  raise AssertionError(f"timed out waiting for {what}")


def _checkpoint_step(trial_dir):
  try:
    return _read_json(os.path.join(trial_dir, "checkpoint.json"))["step"]
  except (OSError, ValueError):
    return 0


def _pids(trial_dir):
  with open(os.path.join(trial_dir, "starts.jsonl")) as f:
    return [json.loads(line)["pid"] for line in f]


def _exited(pid):
  """Whether process `pid` is gone or a zombie (Linux)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
  except FileNotFoundError:
    return True


def test_killed_sweep_resumes_interrupted_trials(tmp_path):
  study_dir = tmp_path / "study"
  trial = lambda i: str(study_dir / "trials" / f"{i:04d}")
  args = ("--num_trials=4", "--run", "--parallel=2",
          "--config.max_train_steps=60")
  sweep = subprocess.Popen(
      _sweep_argv(study_dir, *args), cwd=REPO,
      env=_env(FAKE_TRAINER_HOLD_AT_STEP="5"),
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    # Both workers are mid-trial, held at step 5 until killed: two trials run
    # at the same time (one at a time, trial 0001 would never start).
    _wait_for(lambda: [_checkpoint_step(trial(i)) for i in (0, 1)] == [5, 5],
              90, "two trials to run in parallel")
  finally:
    sweep.send_signal(signal.SIGKILL)
    sweep.wait()
  # The trials die with the sweep (a held trial lives on otherwise) and
  # release their locks.
  _wait_for(lambda: not any(records.is_locked(trial(i)) for i in range(4)),
            20, "trial processes to exit")
  assert all(_exited(pid) for i in (0, 1) for pid in _pids(trial(i)))
  killed_at = [_checkpoint_step(trial(i)) for i in (0, 1)]
  assert killed_at == [5, 5]
  assert [records.trial_status(trial(i))["status"] for i in range(4)] == [
      "interrupted", "interrupted", "pending", "pending"]

  _sweep(study_dir, *args)
  for i in (0, 1):
    assert _starts(trial(i)) == [0, killed_at[i]]  # Resumed from checkpoint.
    with open(os.path.join(trial(i), "log.txt")) as f:
      assert f.read().count("launch:") == 2
  assert _starts(trial(2)) == _starts(trial(3)) == [0]
  rows = _read_csv(study_dir / "results.csv")
  assert [r["status"] for r in rows] == ["completed"] * 4
  assert all(r["max_train_steps"] == "60" and r["best_value"] for r in rows)
  # The trials' warmup is prepended to the 60 steps.
  warmups = [t["params"]["optimizer.warmup_steps"]
             for t in _read_json(study_dir / "study.json")["trials"]]
  assert [int(r["final_step"]) for r in rows] == [
      int(r["total_train_steps"]) for r in rows] == [60 + w for w in warmups]
  table = _read_csv(tmp_path / "studies.csv")
  assert len(table) == 1
  assert table[0]["num_completed"] == "4" and table[0]["num_trials"] == "4"
  assert float(table[0]["best_value"]) == min(float(r["best_value"])
                                              for r in rows)


def test_one_study_per_scientific_value(tmp_path):
  study_dir = tmp_path / "optimizers"
  _sweep(study_dir, "--num_trials=3", "--run", "--parallel=2",
         config="tests/configs/optimizer_study.py")
  table = _read_csv(tmp_path / "studies.csv")
  assert [r["study"] for r in table] == ["optimizers/optimizer.name=nesterov",
                                         "optimizers/optimizer.name=adam"]
  assert all(r["num_completed"] == "3" and r["best_value"] for r in table)
  adam = _read_json(study_dir / "optimizer.name=adam" / "study.json")
  assert adam["scientific"] == {"optimizer.name": "adam"}
  for t in adam["trials"]:
    assert t["params"]["optimizer.name"] == "adam"
    assert "optimizer.beta1" in t["params"]
    assert "optimizer.momentum" not in t["params"]
    config = _read_json(study_dir / "optimizer.name=adam" / "trials" /
                        t["trial_id"] / "config.json")
    assert config["optimizer"]["name"] == "adam"
  # Relaunching a second study beside it adds rows, never duplicates them.
  _sweep(study_dir, "--num_trials=3", config="tests/configs/optimizer_study.py")
  _sweep(tmp_path / "tiny", "--num_trials=2")
  assert len(_read_csv(tmp_path / "studies.csv")) == 3


@pytest.mark.slow
def test_real_trainer_end_to_end(tmp_path):
  """Two trials of tuning_playbook.main on mnist1d_mlp, 20 steps each."""
  study_dir = tmp_path / "study"
  # A fresh data directory: both trials prepare MNIST-1D at the same time.
  _sweep(study_dir, "--num_trials=2", "--run", "--parallel=2",
         f"--config.data.data_dir={tmp_path / 'data'}", fake=False)
  rows = _read_csv(study_dir / "results.csv")
  assert [r["status"] for r in rows] == ["completed", "completed"], [
      r["reason"] for r in rows]
  for r in rows:
    assert r["final_step"] and r["command"].startswith(
        "python -m tuning_playbook.main")
    assert os.path.exists(study_dir / "trials" / r["trial_id"] /
                          "summary.json")
  table = _read_csv(tmp_path / "studies.csv")[0]
  assert table["num_unfinished"] == "0" and table["best_value"]


def test_terminated_sweep_stops_its_trials_and_records_them(tmp_path):
  study_dir = tmp_path / "study"
  trial = lambda i: str(study_dir / "trials" / f"{i:04d}")
  sweep = subprocess.Popen(
      _sweep_argv(study_dir, "--num_trials=3", "--run", "--parallel=2",
                  "--config.max_train_steps=100"),
      cwd=REPO, env=_env(FAKE_TRAINER_HOLD_AT_STEP="3"),
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    _wait_for(lambda: [_checkpoint_step(trial(i)) for i in (0, 1)] == [3, 3],
              90, "trials 0000 and 0001 to reach step 3")
  finally:
    sweep.send_signal(signal.SIGTERM)
    assert sweep.wait(timeout=60) == 128 + signal.SIGTERM
  assert not records.is_locked(trial(0)) and not records.is_locked(trial(1))
  rows = _read_csv(study_dir / "results.csv")
  assert [r["status"] for r in rows] == ["interrupted", "interrupted",
                                         "pending"]
  assert _read_json(os.path.join(trial(0), "runner.json"))["status"] == (
      "interrupted")


# A trial that logs its start and end, and ends once it has seen two trials
# running (or all `total` started): one never ends before another has run
# beside it. A runner that never runs two at once leaves each waiting 30 s.
_PAIRED_TRIAL = textwrap.dedent("""\
    import os, sys, time
    events, name, total = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def log(kind):
      fd = os.open(events, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
      os.write(fd, f"{kind} {name}\\n".encode())
      os.close(fd)

    log("start")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
      with open(events) as f:
        kinds = [line.split()[0] for line in f]
      starts = kinds.count("start")
      if starts - kinds.count("end") >= 2 or starts == total:
        break
      time.sleep(0.01)
    log("end")
    """)


def test_runner_bounds_parallelism_and_survives_unstartable_trials(tmp_path):
  from tuning_playbook.studies import study_runner  # pylint: disable=g-import-not-at-top
  script, events = tmp_path / "trial.py", str(tmp_path / "events.txt")
  script.write_text(_PAIRED_TRIAL)
  jobs = [study_runner.TrialJob(str(tmp_path / f"t{i}"),
                                [sys.executable, str(script), events, f"t{i}",
                                 "5"]) for i in range(5)]
  jobs.insert(2, study_runner.TrialJob(str(tmp_path / "missing"),
                                       [str(tmp_path / "no_such_binary")]))
  updated, running, runner_counts = [], set(), []

  def on_update(job):
    # What the runner recorded: launched and not yet seen to end.
    updated.append(job)
    status = _read_json(os.path.join(job.trial_dir, "runner.json"))["status"]
    (running.add if status == "running" else running.discard)(job.trial_dir)
    runner_counts.append(len(running))

  launched = study_runner.run_trials(jobs, parallel=2, poll_seconds=0.02,
                                     on_update=on_update)
  assert launched == 5
  # Never more than two launched at once (all five at once without a bound).
  assert max(runner_counts) == 2
  # Two trial processes ran side by side: a start before the other's end.
  with open(events) as f:
    lines = [line.split() for line in f]
  assert sorted(name for kind, name in lines if kind == "end") == [
      f"t{i}" for i in range(5)]
  running_now = peak = 0
  for kind, _ in lines:
    running_now += 1 if kind == "start" else -1
    peak = max(peak, running_now)
  assert peak == 2
  record = records.trial_status(str(tmp_path / "missing"))
  assert record["status"] == "failed"
  assert record["reason"].startswith("could not start the trial")
  # Exited 0 without a summary: a trainer that did not honour the contract.
  assert records.trial_status(str(tmp_path / "t0"))["reason"] == (
      "exited 0 without writing summary.json")
  assert len(updated) == 11  # Each launch and each end, plus the failure.


LEARNING_RATE = {"optimizer.learning_rate": {"scale": "log", "min": 1e-3, "max": 1.0}}


@pytest.mark.parametrize("space,warned", [
    ({"nuisance": {"batch_size": {"values": [32, 64]}, **LEARNING_RATE}}, True),
    ({"scientific": {"batch_size": {"values": [32, 64]}},
      "nuisance": LEARNING_RATE}, False)])
def test_a_batch_size_tuned_as_a_nuisance_hyperparameter_is_warned_of(
    tmp_path, space, warned):
  config = _write_config(tmp_path / "batch.py", space)
  result = _sweep(tmp_path / "study", "--num_trials=4", config=config)
  message = ("batch_size is searched as a nuisance hyperparameter, but the batch "
             "size is not a hyperparameter to tune for validation performance")
  assert (message in result.stderr) == warned, result.stderr[-2000:]
  assert os.listdir(tmp_path / "study")  # A warning, not a refusal.
