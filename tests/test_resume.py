"""Kill-and-resume, relaunching finished runs, and refusing another config.

Each run is a real `python -m tuning_playbook.main` process; kills are SIGKILL
at varying moments (during training, evals and checkpoint saves).
"""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time

import orbax.checkpoint as ocp
import pytest

from tests import helpers
from tuning_playbook.common import termination

# Small enough to be quick, long enough that kills land inside the run: 60
# steps, the tiny config's 5 warmup steps prepended to 55.
RUN_FLAGS = ("--config.max_train_steps=55", "--config.eval_every_steps=10",
             "--config.log_every_steps=4", "--config.num_best_checkpoints=2",
             "--config.data.batches_per_transfer=4")


@pytest.fixture(scope="module")
def data_flag():
  # The session's TFDS directory (tests/conftest.py): MNIST-1D, built once.
  return f"--config.data.data_dir={os.environ['TFDS_DATA_DIR']}"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_flag):
  workdir = str(tmp_path_factory.mktemp("reference"))
  result = helpers.run_main(workdir, data_flag, *RUN_FLAGS, num_devices=2)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def killed_after_checkpoint_20(tmp_path_factory, data_flag):
  """A run on 2 devices killed once its step-20 checkpoint exists; tests
  resume copies of it."""
  workdir = str(tmp_path_factory.mktemp("killed_after_20") / "run")
  _run_and_kill_after_checkpoint(workdir, data_flag, 20, num_devices=2)
  return workdir


def _copy(workdir, tmp_path, name):
  copy = str(tmp_path / name)
  shutil.copytree(workdir, copy)
  return copy


def _tree_digest(root):
  digest = hashlib.sha256()
  for dirpath, dirnames, filenames in sorted(os.walk(root)):
    dirnames.sort()
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      digest.update(path.encode())
      st = os.stat(path)
      digest.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
      with open(path, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()


def _kept_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                if d.isdigit())


@pytest.mark.slow
def test_killed_runs_resume_to_the_same_result(reference_run, data_flag, tmp_path):
  workdir = str(tmp_path / "killed")
  metrics = os.path.join(workdir, "metrics.jsonl")
  kills = 0
  # Kill after the k-th new metrics line appears, plus a varying delay, so
  # kills land in training, in evals and in checkpoint saves.
  for attempt, (lines_before_kill, delay) in enumerate(
      [(2, 0.0), (3, 0.05), (2, 0.2)]):
    start_lines = len(helpers.read_jsonl(metrics)) if os.path.exists(metrics) else 0
    proc = subprocess.Popen(
        helpers.main_command(workdir, data_flag, *RUN_FLAGS), cwd=helpers.REPO,
        env=helpers.subprocess_env(2), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
      n = sum(1 for _ in open(metrics)) if os.path.exists(metrics) else 0
      if n >= start_lines + lines_before_kill:
        time.sleep(delay)
        break
      time.sleep(0.01)
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      kills += 1
    proc.wait()
    if os.path.exists(os.path.join(workdir, "summary.json")):
      break
  assert kills >= 2, f"only {kills} kills landed (attempts: {attempt + 1})"
  result = helpers.run_main(workdir, data_flag, *RUN_FLAGS, num_devices=2)
  assert result.returncode == 0, result.stderr[-3000:]

  ref_rows = helpers.read_jsonl(os.path.join(reference_run, "metrics.jsonl"))
  rows = helpers.read_jsonl(metrics)
  assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
  assert helpers.without_timing(rows) == helpers.without_timing(ref_rows)
  assert (helpers.read_jsonl(os.path.join(workdir, "grad_norms.jsonl"))
          == helpers.read_jsonl(os.path.join(reference_run, "grad_norms.jsonl")))
  summary = helpers.read_json(os.path.join(workdir, "summary.json"))
  ref_summary = helpers.read_json(os.path.join(reference_run, "summary.json"))
  for key in ("status", "best_step", "best_value", "final_step"):
    assert summary[key] == ref_summary[key]
  assert _kept_steps(workdir) == _kept_steps(reference_run)
  # The optimizer's own step count equals the training step after resume.
  state = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", "60", "state"))
  assert int(state["step"]) == 60
  assert int(state["opt_state"]["count"]) == 60


def _terminate_after_new_rows(workdir, data_flag, rows, delay):
  """Runs until `rows` more metrics rows are logged, then sends SIGTERM
  `delay` seconds later; returns the step the run says it stopped at."""
  metrics = os.path.join(workdir, "metrics.jsonl")
  start = len(helpers.read_jsonl(metrics)) if os.path.exists(metrics) else 0
  proc = subprocess.Popen(
      helpers.main_command(workdir, data_flag, *RUN_FLAGS), cwd=helpers.REPO,
      env=helpers.subprocess_env(2), stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while proc.poll() is None and time.time() < deadline and not (
      os.path.exists(metrics) and len(helpers.read_jsonl(metrics)) >= start + rows):
    time.sleep(0.005)
  time.sleep(delay)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == termination.TERMINATED_EXIT_CODE, err[-3000:]
  match = re.search(r"Stopped on SIGTERM at step (\d+)", err)
  assert match, err[-3000:]
  stopped = int(match.group(1))
  # No step after the stop was recorded, and the stop is the latest checkpoint.
  last_logged = helpers.read_jsonl(metrics)[-1]["step"]
  assert last_logged <= stopped
  assert helpers.read_jsonl(os.path.join(workdir, "grad_norms.jsonl"))[-1]["step"] == last_logged
  assert max(_kept_steps(workdir)) == stopped
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  return stopped


@pytest.mark.slow
def test_sigterm_resumes_with_nothing_lost(reference_run, data_flag, tmp_path):
  """SIGTERM twice during training: each time the run checkpoints the step it
  reached and exits 143; the relaunch writes what an uninterrupted run writes.
  (A stop between log steps: test_training.py.)"""
  workdir = str(tmp_path / "terminated")
  stops = [_terminate_after_new_rows(workdir, data_flag, 1, delay)
           for delay in (0.0, 0.1)]
  assert stops[0] < stops[1] < 60, stops
  result = helpers.run_main(workdir, data_flag, *RUN_FLAGS, num_devices=2)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Resumed from checkpoint at step {stops[-1]}." in result.stderr
  ref_rows = helpers.read_jsonl(os.path.join(reference_run, "metrics.jsonl"))
  assert helpers.without_timing(helpers.read_jsonl(os.path.join(
      workdir, "metrics.jsonl"))) == helpers.without_timing(ref_rows)
  assert (helpers.read_jsonl(os.path.join(workdir, "grad_norms.jsonl"))
          == helpers.read_jsonl(os.path.join(reference_run, "grad_norms.jsonl")))
  # A stop's checkpoint is not an eval: it is gone once superseded.
  assert _kept_steps(workdir) == _kept_steps(reference_run)
  summary = helpers.read_json(os.path.join(workdir, "summary.json"))
  ref_summary = helpers.read_json(os.path.join(reference_run, "summary.json"))
  for key in ("status", "best_step", "best_value", "final_step"):
    assert summary[key] == ref_summary[key]
  print(f"\nstopped at steps {stops}")


def _run_and_kill_after_checkpoint(workdir, data_flag, step, num_devices):
  proc = subprocess.Popen(
      helpers.main_command(workdir, data_flag, *RUN_FLAGS), cwd=helpers.REPO,
      env=helpers.subprocess_env(num_devices), stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  path = os.path.join(workdir, "checkpoints", str(step))
  deadline = time.time() + 240
  while proc.poll() is None and not os.path.isdir(path) and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(workdir, "summary.json"))


@pytest.mark.slow
def test_half_written_checkpoints_are_never_restored(
    reference_run, killed_after_checkpoint_20, data_flag, tmp_path):
  workdir = _copy(killed_after_checkpoint_20, tmp_path, "run")
  checkpoints = os.path.join(workdir, "checkpoints")
  # What a kill leaves behind mid-save and mid-delete.
  os.makedirs(os.path.join(checkpoints, "30.orbax-checkpoint-tmp-1234", "state"))
  with open(os.path.join(checkpoints, "30.orbax-checkpoint-tmp-1234", "state", "junk"), "w") as f:
    f.write("partial")
  os.makedirs(os.path.join(checkpoints, "todelete", "10"))
  result = helpers.run_main(workdir, data_flag, *RUN_FLAGS, num_devices=2)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed from checkpoint at step" in result.stderr
  assert helpers.without_timing(helpers.read_jsonl(os.path.join(
      workdir, "metrics.jsonl"))) == helpers.without_timing(helpers.read_jsonl(
          os.path.join(reference_run, "metrics.jsonl")))
  assert not any("tmp" in d for d in os.listdir(checkpoints))
  assert "todelete" not in os.listdir(checkpoints) or not os.listdir(
      os.path.join(checkpoints, "todelete"))


@pytest.mark.slow
def test_relaunching_a_finished_run_changes_nothing(reference_run, data_flag):
  before = _tree_digest(reference_run)
  result = helpers.run_main(reference_run, data_flag, *RUN_FLAGS)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "already finished" in result.stderr
  assert _tree_digest(reference_run) == before


@pytest.mark.slow
def test_another_config_is_refused_and_nothing_touched(reference_run, data_flag):
  before = _tree_digest(reference_run)
  result = helpers.run_main(reference_run, data_flag, *RUN_FLAGS,
                            "--config.optimizer.learning_rate=0.3",
                            "--config.batch_size=32")
  assert result.returncode == 2
  assert "optimizer.learning_rate: 0.05 -> 0.3" in result.stderr
  assert "batch_size: 16 -> 32" in result.stderr
  assert _tree_digest(reference_run) == before


@pytest.mark.slow
def test_a_run_recorded_before_a_config_key_existed_is_the_same_run(
    reference_run, data_flag, tmp_path):
  workdir = str(tmp_path / "older")
  shutil.copytree(reference_run, workdir)
  config = helpers.read_json(os.path.join(workdir, "config.json"))
  del config["data"]["on_device_max_mb"]
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f)
  before = _tree_digest(workdir)
  result = helpers.run_main(workdir, data_flag, *RUN_FLAGS)
  assert result.returncode == 0 and "already finished" in result.stderr, (
      result.stderr[-3000:])
  assert _tree_digest(workdir) == before  # Another value is refused: test_records.


@pytest.mark.slow
def test_resume_on_another_device_count(
    reference_run, killed_after_checkpoint_20, data_flag, tmp_path):
  """A checkpoint written on 2 devices resumes on 4 to nearly the same result."""
  workdir = _copy(killed_after_checkpoint_20, tmp_path, "topology")
  result = helpers.run_main(workdir, data_flag, *RUN_FLAGS, num_devices=4)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed from checkpoint at step" in result.stderr
  rows = helpers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  ref_rows = helpers.read_jsonl(os.path.join(reference_run, "metrics.jsonl"))
  assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
  for row, ref in zip(rows, ref_rows):
    assert row.keys() == ref.keys()
    row, ref = helpers.without_timing([row, ref])
    for key in row:
      assert row[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (row["step"], key)


@pytest.mark.slow
def test_a_failed_summary_is_dropped_when_the_run_starts_again(
    killed_after_checkpoint_20, data_flag, tmp_path):
  workdir = _copy(killed_after_checkpoint_20, tmp_path, "failed_then_resumed")
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    f.write('{"status": "failed", "reason": "simulated"}')
  proc = subprocess.Popen(
      helpers.main_command(workdir, data_flag, *RUN_FLAGS), cwd=helpers.REPO,
      env=helpers.subprocess_env(2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  metrics = os.path.join(workdir, "metrics.jsonl")
  start_lines = len(helpers.read_jsonl(metrics))
  while time.time() < deadline and len(helpers.read_jsonl(metrics)) <= start_lines:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  # Killed while training: no summary, so a study sees it as interrupted.
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
