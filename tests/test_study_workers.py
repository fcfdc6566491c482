"""Study workers sharing a study directory, trial claims, SLURM job arrays."""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests import helpers
from tests import test_sweep
from tuning_playbook.common import records
from tuning_playbook.studies import slurm
from tuning_playbook.studies import study_runner
from tuning_playbook.studies import trial_claims
from tuning_playbook.studies import trial_lease

REPO = test_sweep.REPO


def _launches(trial_dir):
  with open(os.path.join(trial_dir, "log.txt")) as f:
    return f.read().count("launch:")


def _trial_dirs(study_dir):
  trials = os.path.join(study_dir, "trials")
  return [os.path.join(trials, t) for t in sorted(os.listdir(trials))]


def test_workers_started_at_once_run_every_trial_exactly_once(tmp_path):
  study_dir = tmp_path / "study"
  argv = test_sweep._sweep_argv(study_dir, "--num_trials=8", "--worker",
                                "--config.max_train_steps=10")
  workers = [subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True,
                              env=test_sweep._env(FAKE_TRAINER_STEP_SECONDS="0.02"))
             for _ in range(3)]
  for worker in workers:
    _, err = worker.communicate(timeout=240)
    assert worker.returncode == 0, err[-3000:]
  trials = _trial_dirs(study_dir)
  assert len(trials) == 8
  for trial in trials:
    assert test_sweep._starts(trial) == [0]
    assert _launches(trial) == 1
    assert not os.path.exists(os.path.join(trial, trial_claims.CLAIM_FILE))
  rows = test_sweep._read_csv(study_dir / "results.csv")
  assert [r["status"] for r in rows] == ["completed"] * 8


def test_relaunched_worker_resumes_a_killed_workers_trial(tmp_path):
  study_dir = tmp_path / "study"
  argv = test_sweep._sweep_argv(study_dir, "--num_trials=2", "--worker",
                                "--config.max_train_steps=60")
  trial = str(study_dir / "trials" / "0000")
  worker = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env=test_sweep._env(FAKE_TRAINER_HOLD_AT_STEP="3"))
  try:
    test_sweep._wait_for(lambda: test_sweep._checkpoint_step(trial) == 3, 90,
                         "trial 0000 to reach step 3")
  finally:
    worker.send_signal(signal.SIGKILL)
    worker.wait()
  # The dead worker's claim is left behind, and judged stale on this host.
  assert trial_claims.read_claim(trial)["pid"] == worker.pid
  test_sweep._wait_for(lambda: not records.is_locked(trial), 20,
                       "the trial process to exit")
  test_sweep._sweep(study_dir, "--num_trials=2", "--worker",
                    "--config.max_train_steps=60")
  assert test_sweep._starts(trial) == [0, 3]
  rows = test_sweep._read_csv(study_dir / "results.csv")
  assert [r["status"] for r in rows] == ["completed"] * 2


def _write_claim(trial_dir, host, pid, age_seconds=0.0):
  os.makedirs(trial_dir, exist_ok=True)
  path = os.path.join(trial_dir, trial_claims.CLAIM_FILE)
  with open(path, "w") as f:
    json.dump({"host": host, "pid": pid, "token": "old"}, f)
  then = time.time() - age_seconds
  os.utime(path, (then, then))


def _dead_pid():
  process = subprocess.Popen([sys.executable, "-c", ""])
  process.wait()
  return process.pid


def test_claims_are_exclusive_and_stale_ones_are_taken_over(tmp_path):
  here = socket.gethostname()
  claim = trial_claims.try_claim(str(tmp_path / "a"))
  assert claim is not None
  assert trial_claims.try_claim(str(tmp_path / "a")) is None  # Live owner.
  claim.release()
  assert trial_claims.try_claim(str(tmp_path / "a")) is not None

  _write_claim(tmp_path / "dead", here, _dead_pid())
  assert trial_claims.try_claim(str(tmp_path / "dead")) is not None
  _write_claim(tmp_path / "elsewhere", "another-host", 1)
  assert trial_claims.try_claim(str(tmp_path / "elsewhere")) is None
  _write_claim(tmp_path / "silent", "another-host", 1,
               age_seconds=trial_claims.STALE_SECONDS + 5)
  taken = trial_claims.try_claim(str(tmp_path / "silent"))
  assert taken is not None
  assert trial_claims.read_claim(str(tmp_path / "silent"))["token"] == taken.token


def test_a_killed_owner_not_yet_reaped_holds_no_claim(tmp_path):
  # A worker killed together with its parent stays a zombie until PID 1
  # reaps it, which in a container may take seconds.
  zombie = subprocess.Popen([sys.executable, "-c", ""])
  try:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
      with open(f"/proc/{zombie.pid}/stat") as f:
        if f.read().rpartition(")")[2].split()[0] == "Z":
          break
      time.sleep(0.05)
    else:
      raise AssertionError("the child never exited")
    _write_claim(tmp_path / "t", socket.gethostname(), zombie.pid)
    assert trial_claims.is_stale(str(tmp_path / "t"))
    assert trial_claims.try_claim(str(tmp_path / "t")) is not None
  finally:
    zombie.wait()
  claim = trial_claims.try_claim(str(tmp_path / "live"))
  assert not trial_claims.is_stale(str(tmp_path / "live"))  # This process.
  claim.release()


def test_a_launch_trains_a_trial_released_after_its_workers_passed_it(tmp_path):
  # The workers left the trial to a live claim that was then released: the
  # launch must not end with it unfinished.
  left = tmp_path / "left"
  left.mkdir()
  records.write_runner(str(left), records.RUNNING, pid=_dead_pid())
  assert study_runner.wait_for_claims_elsewhere([str(left)],
                                                poll_seconds=0.01)
  done = tmp_path / "done"
  done.mkdir()
  records.write_summary(str(done), {"status": "completed"})
  assert not study_runner.wait_for_claims_elsewhere([str(done)],
                                                    poll_seconds=0.01)
  # Held by a live claim (this process's) until the third poll releases it.
  claim = trial_claims.try_claim(str(left))
  polls = []
  def poll():
    polls.append(len(polls))
    if len(polls) == 3:
      claim.release()
  assert study_runner.wait_for_claims_elsewhere(
      [str(left), str(done)], on_poll=poll, poll_seconds=0.01)
  assert len(polls) == 3  # It waited while the claim was live.


def test_a_failed_trial_is_released_once_and_keeps_its_failure(tmp_path):
  def trial(name, status=None, **runner):
    path = str(tmp_path / name)
    os.makedirs(path)
    if status:
      records.write_summary(path, {"status": status, "reason": f"{status} here"})
    if runner:
      records.write_runner(path, records.EXITED, **runner)
    return path

  exited = trial("exited", returncode=1, error=None, started="s", command=["x"])
  failed = trial("failed", records.FAILED)
  done, diverged = trial("done", records.COMPLETED), trial("diverged", records.DIVERGED)
  reason = records.trial_status(exited)["reason"]
  assert reason == "exited with code 1"
  for path in (exited, failed):
    assert not records.needs_run(path)
    assert trial_lease.release_failed(path)
    assert records.trial_status(path)["status"] == records.INTERRUPTED
    assert records.needs_run(path)
    assert not trial_lease.release_failed(path)  # Once: it is not failed now.
  runner = test_sweep._read_json(os.path.join(exited, records.RUNNER_FILE))
  assert runner["released_failure"] == reason
  assert runner["command"] == ["x"] and runner["returncode"] == 1
  assert not os.path.exists(os.path.join(failed, records.SUMMARY_FILE))
  assert test_sweep._read_json(os.path.join(failed, records.RUNNER_FILE))[
      "released_failure"] == "failed here"
  for path, status in ((done, records.COMPLETED), (diverged, records.DIVERGED)):
    assert not trial_lease.release_failed(path)
    assert records.trial_status(path)["status"] == status
  # A trial another runner holds is left to it.
  held = trial("held", records.FAILED)
  claim = trial_claims.try_claim(held)
  assert not trial_lease.release_failed(held)
  assert records.trial_status(held)["status"] == records.FAILED
  claim.release()
  assert not os.path.exists(os.path.join(exited, trial_claims.CLAIM_FILE))


def test_heartbeat_keeps_a_claim_fresh(tmp_path):
  claim = trial_claims.try_claim(str(tmp_path / "t"))
  then = time.time() - trial_claims.STALE_SECONDS - 5
  os.utime(claim.path, (then, then))
  claim.refresh(now=claim.refreshed + trial_claims.HEARTBEAT_SECONDS + 1)
  assert not trial_claims.is_stale(str(tmp_path / "t"))


def test_emitted_slurm_script_runs_the_study_worker(tmp_path):
  study_dir = tmp_path / "study"
  script = tmp_path / "study.sbatch"
  result = test_sweep._sweep(study_dir, "--num_trials=3",
                             "--config.max_train_steps=5",
                             f"--emit_slurm={script}", "--slurm_workers=4",
                             "--slurm_directive=--time=01:00:00",
                             "--slurm_directive=#SBATCH --gres=gpu:1")
  assert f"sbatch {script}" in result.stdout
  assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
  text = script.read_text()
  lines = text.splitlines()
  assert lines[0] == "#!/bin/bash"
  for directive in ("--array=0-3", "--time=01:00:00", "--gres=gpu:1",
                    "--job-name=study", "--cpus-per-task=8",
                    # SIGTERM 180 s before the time limit, to the launcher.
                    "--signal=B:TERM@180",
                    f"--output={study_dir / 'slurm' / '%A_%a.out'}"):
    assert f"#SBATCH {directive}" in lines
  assert (study_dir / "slurm").is_dir()
  assert f"cd {shlex.quote(REPO)}" in lines
  command = shlex.split(lines[-1])
  assert command[:4] == ["exec", sys.executable, "-m", "tuning_playbook.sweep"]
  assert command[-2:] == ["--run", "--worker"]
  for flag in (f"--study_dir={study_dir}", "--num_trials=3", "--seed=0",
               "--config.max_train_steps=5", "--trainer_module=fake_trainer",
               f"--config={test_sweep.TINY}"):
    assert flag in command
  # Run as a plain script (the #SBATCH lines are comments), it is a worker.
  subprocess.run(["bash", str(script)], env=test_sweep._env(), check=True,
                 capture_output=True, timeout=240)
  rows = test_sweep._read_csv(study_dir / "results.csv")
  assert [r["status"] for r in rows] == ["completed"] * 3


def test_slurm_directives_replace_the_scripts_own_signal_and_cpus():
  text = slurm.job_array_script(
      ["true"], num_workers=2, job_name="s", log_dir="/tmp", workdir="/tmp",
      directives=["--signal=B:USR1@600", "#SBATCH --cpus-per-task=32"],
      cpus_per_task=4)
  lines = text.splitlines()
  assert "#SBATCH --signal=B:USR1@600" in lines
  assert "#SBATCH --cpus-per-task=32" in lines
  assert sum(line.startswith("#SBATCH --signal") for line in lines) == 1
  assert sum(line.startswith("#SBATCH --cpus-per-task") for line in lines) == 1


def test_slurm_script_refuses_bad_arguments():
  with pytest.raises(ValueError, match="num_workers"):
    slurm.job_array_script(["true"], num_workers=0, job_name="s",
                           log_dir="/tmp", workdir="/tmp")
  with pytest.raises(ValueError, match="several lines"):
    slurm.job_array_script(["true"], num_workers=1, job_name="s",
                           log_dir="/tmp", workdir="/tmp",
                           directives=["--time=1\nrm -rf /"])


def test_trials_share_one_compilation_cache_and_the_user_setting_wins(tmp_path,
                                                                      monkeypatch):
  from tuning_playbook.studies import study_launch  # pylint: disable=g-import-not-at-top
  studies = [type("S", (), {"study_dir": str(tmp_path / "study" / v)})()
             for v in ("adam", "sgd")]
  env = study_launch.compilation_cache_environment(studies)
  assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "study" / ".jax_cache")
  assert env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0"
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/elsewhere")
  trial_env = study_launch.trial_environment(studies[:1])
  assert trial_env["JAX_COMPILATION_CACHE_DIR"] == "/elsewhere"
  assert trial_env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] == "-1"


@pytest.mark.slow
def test_second_trial_loads_its_programs_from_the_compilation_cache(tmp_path):
  """Two real trial processes of the same shapes, one after the other (a
  study worker's second trial reuses the first's programs in memory)."""
  study_dir = tmp_path / "study"
  # XLA's backend optimisations off: the trials' results are compared with
  # nothing, and the cache keys its programs under the flag all the same.
  env = test_sweep._env(
      JAX_DEBUG_LOG_MODULES="jax._src.compiler",
      XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {helpers.FAST_COMPILE}".strip())
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  test_sweep._sweep(study_dir, "--num_trials=2", "--run", "--isolation=process",
                    env=env, fake=False)
  cache = study_dir / ".jax_cache"
  assert len(os.listdir(cache)) > 0
  first, second = _trial_dirs(study_dir)
  hits = lambda trial: open(os.path.join(trial, "log.txt")).read().count(
      "Persistent compilation cache hit")
  # The first trial compiles (and may hit programs it compiled twice); the
  # second loads at least its train and eval steps.
  assert hits(second) >= 2 and hits(second) > hits(first)
