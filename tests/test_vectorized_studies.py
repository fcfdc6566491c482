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


def _env(num_devices=None):
  """test_sweep._env with XLA's backend optimisations off (helpers.FAST_COMPILE):
  every run of this file is compared, if at all, only with runs of this file.
  The simulated devices stay those of the pytest process unless given."""
  devices = (os.environ.get("XLA_FLAGS", "") if num_devices is None else
             f"--xla_force_host_platform_device_count={num_devices}")
  return test_sweep._env(XLA_FLAGS=f"{devices} {helpers.FAST_COMPILE}".strip())


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
  # devices (data parallel) both ways. Two trials (learning rates, momenta,
  # weight decays and warmups of their own: different last steps).
  args = ("--num_trials=2", "--run") + CNN_SHORT
  env = _env(num_devices=2)
  alone = tmp_path / "alone"
  test_sweep._sweep(alone, *args, "--isolation=process", "--parallel=2",
                    config=CNN, fake=False, env=env)
  grouped = tmp_path / "grouped"
  test_sweep._sweep(grouped, *args, "--vectorize=2", config=CNN, fake=False,
                    env=env)
  want = test_sweep._read_csv(alone / "results.csv")
  got = test_sweep._read_csv(grouped / "results.csv")
  assert [r["status"] for r in got] == ["completed"] * 2
  assert len({r["final_step"] for r in want}) == 2
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
    assert len(runner["population"]) == 2
    with open(os.path.join(g_dir, "log.txt")) as f:
      log = f.read()
    assert log.count("worker") >= 1 and "Training 2 trial(s) as one population" in log
    # Its own lines, not its partners': one eval line per eval of its own.
    evals = [r for r in _metrics(g_dir) if "eval/test/accuracy" in r]
    assert len(evals) >= 3 and log.count("] eval/test/accuracy=") == len(evals)
    # CLU's progress notes: one per log step of its own after the first.
    notes = log.count("Setting work unit notes")
    assert 0 < notes < len(_metrics(g_dir)), notes
    ended = [line for line in log.splitlines() if ": completed at step" in line]
    assert len(ended) == 1 and f"Trial {g_dir}: completed" in ended[0], ended


def _checkpoint_steps(trial):
  try:
    names = os.listdir(os.path.join(trial, "checkpoints"))
  except OSError:
    return []
  return [int(n) for n in names if n.isdigit()]


def _wait_for_checkpoints(study_dir, step, timeout=180, trials=None):
  """Waits until every trial (of `trials`, if given) has a checkpoint at
  `step` or later."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if trials is not None or os.path.isdir(study_dir / "trials"):
      wanted = _trial_dirs(study_dir) if trials is None else trials
      if wanted and all(max(_checkpoint_steps(t), default=-1) >= step
                        for t in wanted):
        return
    time.sleep(0.05)
  raise AssertionError(f"no checkpoint at step {step} in time")


@pytest.mark.slow
def test_killed_vectorized_study_resumes_exactly(tmp_path):
  # 400 steps (eval and checkpoint every 40): each signal below comes at the
  # first checkpoint it waits for, with most of the run still to train.
  overrides = ("--config.max_train_steps=400", "--config.eval_every_steps=40",
               "--config.log_every_steps=10")
  args = ("--num_trials=3", "--run", "--vectorize=3") + overrides
  study = tmp_path / "study"
  sweep = subprocess.Popen(test_sweep._sweep_argv(study, *args, fake=False),
                           cwd=REPO, env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
  _wait_for_checkpoints(study, 40)
  # SIGTERM to the launcher: its worker stops the population at a step,
  # checkpoints it and marks the trials interrupted.
  sweep.send_signal(signal.SIGTERM)
  _, err = sweep.communicate(timeout=120)
  assert sweep.returncode == 143, err[-2000:]
  for trial in _trial_dirs(study):
    runner = helpers.read_json(os.path.join(trial, "runner.json"))
    assert runner["status"] == "interrupted", runner
    assert not os.path.exists(os.path.join(trial, "summary.json"))
  stopped = max(max(_checkpoint_steps(t)) for t in _trial_dirs(study))
  # Relaunched, then the worker is killed outright (SIGKILL) while it trains:
  # once it has checkpointed past the step it resumed from.
  sweep = subprocess.Popen(test_sweep._sweep_argv(study, *args, fake=False),
                           cwd=REPO, env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
  _wait_for_checkpoints(study, stopped + 1)
  worker_pid = helpers.read_json(os.path.join(_trial_dirs(study)[0], "runner.json"))["pid"]
  os.kill(worker_pid, signal.SIGKILL)
  sweep.send_signal(signal.SIGKILL)
  sweep.wait()
  assert not all(os.path.exists(os.path.join(t, "summary.json"))
                 for t in _trial_dirs(study))
  # The same study uninterrupted (records only: not run yet).
  reference = tmp_path / "reference"
  test_sweep._sweep(reference, "--num_trials=3", *overrides, fake=False)
  # One study worker finishes both: the reference's trials from step 0 as one
  # population, the killed study's (a dead worker's stale claims, resumed
  # from their checkpoints) as another.
  worker = subprocess.run(
      [sys.executable, "-m", "tuning_playbook.study_worker",
       f"--config={test_sweep.TINY}", f"--study_dir={reference}",
       f"--study_dir={study}", "--vectorize=3", *overrides],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
  assert worker.returncode == 0, worker.stderr[-3000:]
  for study_dir in (reference, study):
    trials = _trial_dirs(study_dir)
    for trial in trials:
      runner = helpers.read_json(os.path.join(trial, "runner.json"))
      assert runner["status"] == "exited" and runner["returncode"] == 0
      assert runner["population"] == trials, runner
  for got, want in zip(_trial_dirs(study), _trial_dirs(reference)):
    with open(os.path.join(got, "log.txt")) as f:
      assert "Resumed from checkpoint at step" in f.read().split(" worker ")[-1]
    _assert_close_rows(_metrics(got), _metrics(want), rtol=1e-6)
    _assert_close_rows(_metrics(got, "grad_norms.jsonl"),
                       _metrics(want, "grad_norms.jsonl"), rtol=1e-6)
    assert (helpers.read_json(os.path.join(got, "summary.json"))["best_value"]
            == helpers.read_json(os.path.join(want, "summary.json"))["best_value"])
  test_sweep._sweep(study, "--num_trials=3", *overrides, fake=False)  # Records.
  rows = test_sweep._read_csv(study / "results.csv")
  assert [r["status"] for r in rows] == ["completed"] * 3


@pytest.mark.slow
def test_vectorizing_workers_started_at_once_train_each_trial_once(tmp_path):
  study = tmp_path / "study"
  argv = test_sweep._sweep_argv(study, "--num_trials=6", "--worker",
                                "--vectorize=2", fake=False)
  # Plan the study first, so that the workers race only for trials.
  test_sweep._sweep(study, "--num_trials=6", fake=False)
  workers = [subprocess.Popen(argv, cwd=REPO, env=_env(),
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


def _worker_on_host(host, study_dir, *args, stderr=subprocess.PIPE):
  """A study worker process that names itself `host` in its claims."""
  code = ("import runpy, socket, sys; "
          f"socket.gethostname = lambda: {host!r}; "
          "sys.argv[0] = 'tuning_playbook.study_worker'; "
          "runpy.run_module('tuning_playbook.study_worker', run_name='__main__')")
  return subprocess.Popen(
      [sys.executable, "-c", code, f"--config={test_sweep.TINY}",
       f"--study_dir={study_dir}", *args], cwd=REPO, env=_env(),
      stdout=subprocess.DEVNULL, stderr=stderr, text=True)


@pytest.mark.slow
def test_a_launch_waits_for_trials_held_on_another_host_and_resumes_them_once_given_up(
    tmp_path):
  """A study worker on host "node-a" trains two trials as a population; a
  launch here (not itself a worker) trains the third and then waits for the
  two, held elsewhere. SIGTERM to the worker: it checkpoints, marks its
  trials interrupted and releases their claims, so the launch, as a
  resubmitted SLURM task would, resumes them at once."""
  study = tmp_path / "study"
  overrides = ("--config.max_train_steps=400", "--config.eval_every_steps=40",
               "--config.log_every_steps=10")
  test_sweep._sweep(study, "--num_trials=3", *overrides, fake=False)  # Records only.
  *held, free = _trial_dirs(study)
  worker_err = tmp_path / "node-a.err"
  with open(worker_err, "w") as stderr:
    worker = _worker_on_host("node-a", study, "--vectorize=2", *overrides,
                             stderr=stderr)
  sweep = None
  launch_log = tmp_path / "launch.err"
  passed = False
  try:
    _wait_for_checkpoints(study, 40, trials=held)
    # Stopped mid-training (SIGSTOP) for as long as the launch needs.
    worker.send_signal(signal.SIGSTOP)
    assert [trial_claims.read_claim(t)["host"] for t in held] == ["node-a"] * 2
    assert trial_claims.read_claim(free) is None
    with open(launch_log, "w") as stderr:
      sweep = subprocess.Popen(
          test_sweep._sweep_argv(study, "--num_trials=3", "--run",
                                 "--vectorize=2", *overrides, fake=False),
          cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    worker_log = study / "workers" / "worker-0.log"
    test_sweep._wait_for(
        lambda: "No unclaimed unfinished trial left" in (
            worker_log.read_text() if worker_log.exists() else ""),
        180, "the launch's worker to train the free trial and exit")
    assert helpers.read_json(os.path.join(free, "summary.json"))["status"] == "completed"
    # The launch, not a worker, must wait for the held trials: it says so
    # (and trains them below, once they are given up).
    test_sweep._wait_for(
        lambda: "Waiting for 2 trial(s) claimed by runners elsewhere" in
        launch_log.read_text(), 60, "the launch to wait for the held trials")
    assert sweep.poll() is None
    assert not any(os.path.exists(os.path.join(t, "summary.json")) for t in held)
    # The launch is stopped too while the worker's records are read.
    sweep.send_signal(signal.SIGSTOP)
    worker.send_signal(signal.SIGTERM)
    worker.send_signal(signal.SIGCONT)
    worker.wait(timeout=120)
    assert worker.returncode == 143, worker_err.read_text()[-3000:]
    stopped = {}
    for trial in held:
      assert trial_claims.read_claim(trial) is None
      runner = helpers.read_json(os.path.join(trial, "runner.json"))
      assert runner["status"] == "interrupted" and runner["returncode"] == 143
      stopped[trial] = max(_checkpoint_steps(trial))
      assert records.trial_status(trial)["status"] == "interrupted"
    passed = True
  finally:
    for process in (worker, sweep):
      if process is not None and process.poll() is None:
        if passed:
          process.send_signal(signal.SIGCONT)
        else:
          process.kill()
          process.wait()
  sweep.wait(timeout=180)
  err = launch_log.read_text()
  assert sweep.returncode == 0, err[-3000:]
  assert "Waiting for 2 trial(s) claimed by runners elsewhere" in err
  rows = test_sweep._read_csv(study / "results.csv")
  assert [r["status"] for r in rows] == ["completed"] * 3
  assert worker_log.read_text().count("launch:") == 2
  for trial, step in stopped.items():
    with open(os.path.join(trial, "log.txt")) as f:
      assert f"Resumed from checkpoint at step {step}." in f.read()
