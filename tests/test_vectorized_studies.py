"""Studies run by study workers: `sweep --run --vectorize=K` against one
process per trial, kill and relaunch, workers started at once (subprocesses)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import helpers
from tests import test_sweep
from tuning_playbook.common import records
from tuning_playbook.studies import trial_claims

REPO = test_sweep.REPO
CNN = "configs/mnist1d_cnn.py"
CNN_SHORT = ("--config.max_train_steps=60", "--config.eval_every_steps=20",
             "--config.log_every_steps=10", "--config.data.batches_per_transfer=8")


def _trial_dirs(study_dir):
  trials = os.path.join(study_dir, "trials")
  return [os.path.join(trials, t) for t in sorted(os.listdir(trials))]


def _metrics(trial_dir, name="metrics.jsonl"):
  return helpers.without_timing(helpers.read_jsonl(os.path.join(trial_dir, name)))


def _assert_close_rows(got, want, rtol):
  assert [r["step"] for r in got] == [r["step"] for r in want]
  for g, w in zip(got, want):
    assert set(g) == set(w)
    for key in w:
      np.testing.assert_allclose(g[key], w[key], rtol=rtol, atol=2e-6,
                                 err_msg=f"{key} at step {w['step']}")


@pytest.mark.slow
def test_vectorized_study_matches_one_process_per_trial(tmp_path):
  # The shipped config and its default search space, on 2 simulated
  # devices (data parallel) both ways.
  args = ("--num_trials=3", "--run") + CNN_SHORT
  env = test_sweep._env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
  alone = tmp_path / "alone"
  test_sweep._sweep(alone, *args, "--isolation=process", "--parallel=2",
                    config=CNN, fake=False, env=env)
  grouped = tmp_path / "grouped"
  test_sweep._sweep(grouped, *args, "--vectorize=3", config=CNN, fake=False,
                    env=env)
  want = test_sweep._read_csv(alone / "results.csv")
  got = test_sweep._read_csv(grouped / "results.csv")
  assert [r["status"] for r in got] == ["completed"] * 3
  for g, w in zip(got, want):
    for key in ("trial_id", "status", "best_step", "final_step",
                "optimizer.learning_rate", "optimizer.warmup_steps"):
      assert g[key] == w[key], key
    np.testing.assert_allclose(float(g["best_value"]), float(w["best_value"]),
                               atol=1e-6)
  for g_dir, w_dir in zip(_trial_dirs(grouped), _trial_dirs(alone)):
    _assert_close_rows(_metrics(g_dir), _metrics(w_dir), rtol=1e-5)
    runner = helpers.read_json(os.path.join(g_dir, "runner.json"))
    assert runner["status"] == "exited" and runner["returncode"] == 0
    assert len(runner["population"]) == 3
    with open(os.path.join(g_dir, "log.txt")) as f:
      log = f.read()
    assert log.count("worker") >= 1 and "Training 3 trial(s) as one population" in log
    # Its own lines, not its partners': one eval line per eval of its own.
    evals = [r for r in _metrics(g_dir) if "eval/test/accuracy" in r]
    assert len(evals) >= 3 and log.count("] eval/test/accuracy=") == len(evals)
    # CLU's progress notes: one per log step of its own after the first.
    notes = log.count("Setting work unit notes")
    assert 0 < notes < len(_metrics(g_dir)), notes
    ended = [line for line in log.splitlines() if ": completed at step" in line]
    assert len(ended) == 1 and f"Trial {g_dir}: completed" in ended[0], ended


def _wait_for_checkpoints(study_dir, step, timeout=180):
  """Waits until every trial has a checkpoint at `step` or later."""
  def reached(trial):
    try:
      names = os.listdir(os.path.join(trial, "checkpoints"))
    except OSError:
      return False
    return any(n.isdigit() and int(n) >= step for n in names)

  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if os.path.isdir(study_dir / "trials"):
      trials = _trial_dirs(study_dir)
      if trials and all(reached(t) for t in trials):
        return
    time.sleep(0.1)
  raise AssertionError(f"no checkpoint at step {step} in time")


@pytest.mark.slow
def test_killed_vectorized_study_resumes_exactly(tmp_path):
  args = ("--num_trials=3", "--run", "--vectorize=3",
          "--config.max_train_steps=1000", "--config.eval_every_steps=100",
          "--config.log_every_steps=10")
  reference = tmp_path / "reference"
  test_sweep._sweep(reference, *args, fake=False)
  study = tmp_path / "study"
  sweep = subprocess.Popen(test_sweep._sweep_argv(study, *args, fake=False),
                           cwd=REPO, env=test_sweep._env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
  _wait_for_checkpoints(study, 100)
  # SIGTERM to the launcher: its worker stops the population at a step,
  # checkpoints it and marks the trials interrupted.
  sweep.send_signal(signal.SIGTERM)
  _, err = sweep.communicate(timeout=120)
  assert sweep.returncode == 143, err[-2000:]
  for trial in _trial_dirs(study):
    runner = helpers.read_json(os.path.join(trial, "runner.json"))
    assert runner["status"] == "interrupted", runner
    assert not os.path.exists(os.path.join(trial, "summary.json"))
  # Relaunched, then the worker is killed outright (SIGKILL) while it trains.
  sweep = subprocess.Popen(test_sweep._sweep_argv(study, *args, fake=False),
                           cwd=REPO, env=test_sweep._env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
  _wait_for_checkpoints(study, 300)
  worker_pid = helpers.read_json(os.path.join(_trial_dirs(study)[0], "runner.json"))["pid"]
  os.kill(worker_pid, signal.SIGKILL)
  sweep.send_signal(signal.SIGKILL)
  sweep.wait()
  assert not all(os.path.exists(os.path.join(t, "summary.json"))
                 for t in _trial_dirs(study))
  test_sweep._sweep(study, *args, fake=False)
  for got, want in zip(_trial_dirs(study), _trial_dirs(reference)):
    _assert_close_rows(_metrics(got), _metrics(want), rtol=1e-6)
    _assert_close_rows(_metrics(got, "grad_norms.jsonl"),
                       _metrics(want, "grad_norms.jsonl"), rtol=1e-6)
    assert (helpers.read_json(os.path.join(got, "summary.json"))["best_value"]
            == helpers.read_json(os.path.join(want, "summary.json"))["best_value"])
  rows = test_sweep._read_csv(study / "results.csv")
  assert [r["status"] for r in rows] == ["completed"] * 3


@pytest.mark.slow
def test_vectorizing_workers_started_at_once_train_each_trial_once(tmp_path):
  study = tmp_path / "study"
  argv = test_sweep._sweep_argv(study, "--num_trials=6", "--worker",
                                "--vectorize=2", fake=False)
  # Plan the study first, so that the workers race only for trials.
  test_sweep._sweep(study, "--num_trials=6", fake=False)
  workers = [subprocess.Popen(argv, cwd=REPO, env=test_sweep._env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
  for worker in workers:
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err[-3000:]
  for trial in _trial_dirs(study):
    with open(os.path.join(trial, "log.txt")) as f:
      assert f.read().count(" worker ") == 1, trial
    assert helpers.read_json(os.path.join(trial, "summary.json"))["status"] == "completed"


def test_vectorize_needs_study_workers(tmp_path):
  result = test_sweep._sweep(tmp_path / "s", "--num_trials=2", "--run",
                             "--vectorize=2", "--isolation=process",
                             fake=False, expect_ok=False)
  assert result.returncode == 2
  assert "--vectorize=2" in result.stderr and "--isolation=process" in result.stderr
  result = test_sweep._sweep(tmp_path / "f", "--num_trials=2", "--run",
                             "--isolation=worker", expect_ok=False)
  assert result.returncode == 2
  assert "--trainer_module=fake_trainer" in result.stderr
  assert not os.path.exists(tmp_path / "f" / "trials" / "0000" / "log.txt")


@pytest.mark.slow
def test_a_launch_waits_for_trials_claimed_elsewhere_and_trains_one_given_up(tmp_path):
  study = tmp_path / "study"
  test_sweep._sweep(study, "--num_trials=2", fake=False)  # Plans the study.
  first, held = _trial_dirs(study)
  # A live runner elsewhere (this test's process) holds the second trial.
  claim = trial_claims.try_claim(held)
  assert claim is not None
  sweep = subprocess.Popen(
      test_sweep._sweep_argv(study, "--num_trials=2", "--run", fake=False),
      cwd=REPO, env=test_sweep._env(), stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)
  try:
    worker_log = study / "workers" / "worker-0.log"
    test_sweep._wait_for(
        lambda: "No unclaimed unfinished trial left" in (
            worker_log.read_text() if worker_log.exists() else ""),
        180, "the launch's worker to train the first trial and exit")
    assert helpers.read_json(os.path.join(first, "summary.json"))["status"] == "completed"
    time.sleep(5)  # The launch, not a worker, must wait for the held trial.
    assert sweep.poll() is None
    assert not os.path.exists(os.path.join(held, "summary.json"))
  finally:
    claim.release()  # Its runner gives it up unfinished.
  _, err = sweep.communicate(timeout=180)
  assert sweep.returncode == 0, err[-3000:]
  assert "Waiting for 1 trial(s) claimed by runners elsewhere" in err
  assert helpers.read_json(os.path.join(held, "summary.json"))["status"] == "completed"
  assert worker_log.read_text().count("launch:") == 2


def _worker_on_host(host, study_dir, *args):
  """A study worker process that names itself `host` in its claims."""
  code = ("import runpy, socket, sys; "
          f"socket.gethostname = lambda: {host!r}; "
          "sys.argv[0] = 'tuning_playbook.study_worker'; "
          "runpy.run_module('tuning_playbook.study_worker', run_name='__main__')")
  return subprocess.Popen(
      [sys.executable, "-c", code, f"--config={test_sweep.TINY}",
       f"--study_dir={study_dir}", *args], cwd=REPO, env=test_sweep._env(),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_terminated_worker_hands_its_trials_to_another_host_at_once(tmp_path):
  """SIGTERM to a worker on host "node-a" training a population: it
  checkpoints, marks its trials interrupted and releases their claims, so a
  worker on this host (a resubmitted SLURM task) resumes them at once."""
  study = tmp_path / "study"
  overrides = ("--config.max_train_steps=400", "--config.eval_every_steps=40",
               "--config.log_every_steps=10")
  test_sweep._sweep(study, "--num_trials=2", *overrides, fake=False)  # Records only.
  worker = _worker_on_host("node-a", study, "--vectorize=2", *overrides)
  _wait_for_checkpoints(study, 40)
  claims = [trial_claims.read_claim(t) for t in _trial_dirs(study)]
  assert [c["host"] for c in claims] == ["node-a"] * 2
  worker.send_signal(signal.SIGTERM)
  _, err = worker.communicate(timeout=120)
  assert worker.returncode == 143, err[-3000:]
  stopped = {}
  for trial in _trial_dirs(study):
    assert trial_claims.read_claim(trial) is None
    runner = helpers.read_json(os.path.join(trial, "runner.json"))
    assert runner["status"] == "interrupted" and runner["returncode"] == 143
    stopped[trial] = max(int(n) for n in os.listdir(os.path.join(trial, "checkpoints"))
                         if n.isdigit())
    assert records.trial_status(trial)["status"] == "interrupted"
  result = test_sweep._sweep(study, "--num_trials=2", "--run", "--worker",
                             "--vectorize=2", *overrides, fake=False)
  rows = test_sweep._read_csv(study / "results.csv")
  assert [r["status"] for r in rows] == ["completed"] * 2, result.stderr[-3000:]
  for trial, step in stopped.items():
    with open(os.path.join(trial, "log.txt")) as f:
      assert f"Resumed from checkpoint at step {step}." in f.read()
