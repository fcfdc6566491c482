"""Multi-host behaviour with real processes joined on 127.0.0.1 (gloo on CPU)."""

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import pytest

from tests import helpers
from tuning_playbook.common import termination
from tuning_playbook.training import train
from tuning_playbook.training import watchdog

# 40 steps: the tiny config's 5 warmup steps prepended to 35.
RUN = {"max_train_steps": 35, "eval_every_steps": 10, "log_every_steps": 5,
       "model.use_batch_norm": True, "model.dropout_rate": 0.2,
       "data.batches_per_transfer": 2}
RUN_FLAGS = tuple(f"--config.{key}={value}" for key, value in RUN.items())


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def data_flag(data_dir):
  return f"--config.data.data_dir={data_dir}"


def _run_job(workdir, data_flag, num_processes, devices, *extra):
  command = helpers.main_command(workdir, data_flag, *RUN_FLAGS, *extra)
  results = helpers.wait_all(helpers.start_processes(command, num_processes, devices))
  for rc, err in results:
    assert rc == 0, err[-4000:]
  return results


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory, data_flag):
  workdir = str(tmp_path_factory.mktemp("2x2"))
  start = time.time()
  _run_job(workdir, data_flag, 2, 2)
  return workdir, time.time() - start


@pytest.fixture(scope="module")
def one_by_four(tmp_path_factory, data_dir):
  """The job's config in this process, on its 4 devices (tests/conftest.py:
  compiled as in the job's processes)."""
  assert jax.process_count() == 1 and jax.device_count() == 4
  workdir = str(tmp_path_factory.mktemp("1x4"))
  start = time.time()
  summary = train.train_and_evaluate(
      helpers.load_config(**RUN, **{"data.data_dir": data_dir}), workdir)
  assert summary["status"] == "completed", summary
  return workdir, time.time() - start


def test_two_processes_match_one_process_with_the_same_devices(two_by_two, one_by_four):
  # The job trained the config trained here (its flags, parsed by main).
  assert (helpers.read_json(os.path.join(two_by_two[0], "config.json"))
          == helpers.read_json(os.path.join(one_by_four[0], "config.json")))
  rows = helpers.read_jsonl(os.path.join(two_by_two[0], "metrics.jsonl"))
  ref = helpers.read_jsonl(os.path.join(one_by_four[0], "metrics.jsonl"))
  assert [r["step"] for r in rows] == [r["step"] for r in ref] == list(range(5, 41, 5))
  for row, ref_row in zip(rows, ref):
    assert row.keys() == ref_row.keys()
    row, ref_row = helpers.without_timing([row, ref_row])
    for key, value in row.items():
      # Same data, same dropout keys: only the order of float reductions differs.
      assert value == pytest.approx(ref_row[key], rel=1e-4, abs=1e-6), (row["step"], key)
  summary = helpers.read_json(os.path.join(two_by_two[0], "summary.json"))
  ref_summary = helpers.read_json(os.path.join(one_by_four[0], "summary.json"))
  assert summary["best_step"] == ref_summary["best_step"]
  print(f"\n2x2: {two_by_two[1]:.1f}s, 1x4: {one_by_four[1]:.1f}s; final "
        f"validation error {rows[-1]['eval/validation/error_rate']:.4f} vs "
        f"{ref[-1]['eval/validation/error_rate']:.4f}")


def test_evals_count_every_example_once_on_every_host_count(two_by_two):
  rows = [r for r in helpers.read_jsonl(os.path.join(two_by_two[0], "metrics.jsonl"))
          if "eval/validation/num_examples" in r]
  assert {r["eval/validation/num_examples"] for r in rows} == {61}
  assert {r["eval/test/num_examples"] for r in rows} == {47}
  assert {r["eval/train/num_examples"] for r in rows} == {61}


def test_only_process_zero_writes(two_by_two):
  workdir = two_by_two[0]
  assert len(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))) == 1
  steps = [r["step"] for r in helpers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))]
  assert len(steps) == len(set(steps))
  grad_steps = [r["step"] for r in helpers.read_jsonl(os.path.join(workdir, "grad_norms.jsonl"))]
  assert grad_steps == list(range(1, 41))


@pytest.mark.slow
def test_batch_norm_over_processes_matches_numpy():
  command = [sys.executable, "-m", "tests.multihost_batch_norm_probe"]
  results = helpers.wait_all(helpers.start_processes(command, 2, 2), timeout=180)
  for rc, err in results:
    assert rc == 0, err[-4000:]


@pytest.fixture(scope="module")
def killed_two_by_two(tmp_path_factory, data_flag):
  """A 2 x 2 job whose processes are killed once its step-20 checkpoint
  exists; tests resume copies of it."""
  workdir = str(tmp_path_factory.mktemp("killed") / "run")
  command = helpers.main_command(workdir, data_flag, *RUN_FLAGS)
  procs = helpers.start_processes(command, 2, 2)
  checkpoint = os.path.join(workdir, "checkpoints", "20")
  deadline = time.time() + 240
  while not os.path.isdir(checkpoint) and time.time() < deadline:
    if any(p.poll() is not None for p in procs):
      break
    time.sleep(0.02)
  for p in procs:
    p.send_signal(signal.SIGKILL)
  helpers.wait_all(procs)
  assert os.path.isdir(checkpoint)
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  return workdir


def _copy(workdir, tmp_path, name):
  copy = str(tmp_path / name)
  shutil.copytree(workdir, copy)
  return copy


@pytest.mark.slow
def test_killed_two_process_job_resumes_exactly(two_by_two, killed_two_by_two,
                                                data_flag, tmp_path):
  workdir = _copy(killed_two_by_two, tmp_path, "killed")
  results = _run_job(workdir, data_flag, 2, 2)
  assert all("Resumed from checkpoint at step" in err for _, err in results)
  assert (helpers.without_timing(helpers.read_jsonl(os.path.join(workdir, "metrics.jsonl")))
          == helpers.without_timing(
              helpers.read_jsonl(os.path.join(two_by_two[0], "metrics.jsonl"))))


@pytest.mark.slow
def test_two_process_checkpoint_resumes_on_one_process(two_by_two, killed_two_by_two,
                                                       data_flag, tmp_path):
  """A checkpoint written by 2 processes x 2 devices restores on 1 x 1."""
  workdir = _copy(killed_two_by_two, tmp_path, "topology")
  result = helpers.run_main(workdir, data_flag, *RUN_FLAGS, num_devices=1)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed from checkpoint at step" in result.stderr
  rows = helpers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  ref = helpers.read_jsonl(os.path.join(two_by_two[0], "metrics.jsonl"))
  assert [r["step"] for r in rows] == [r["step"] for r in ref]
  for key in ("eval/validation/error_rate", "train/loss"):
    assert rows[-1][key] == pytest.approx(ref[-1][key], rel=1e-3, abs=1e-6)


def _start_long_job(workdir, data_flag, *extra):
  """A 2 x 2 job that trains for long; returns once it has logged."""
  command = helpers.main_command(workdir, data_flag, *RUN_FLAGS,
                                 "--config.max_train_steps=100000",
                                 "--config.eval_every_steps=50000", *extra)
  procs = helpers.start_processes(command, 2, 2)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while not os.path.exists(metrics) and time.time() < deadline:
    time.sleep(0.05)
  assert os.path.exists(metrics), "the job never logged"
  return procs


@pytest.mark.slow
def test_a_stopped_peer_trips_the_default_watchdog(data_flag, tmp_path):
  """The automatic watchdog (the default) with a short floor, not a fixed limit."""
  procs = _start_long_job(str(tmp_path / "hung"), data_flag,
                          "--config.watchdog_floor_seconds=3")
  procs[1].send_signal(signal.SIGSTOP)  # A host that stops answering.
  start = time.time()
  try:
    _, err = procs[0].communicate(timeout=120)
  finally:
    procs[1].send_signal(signal.SIGKILL)
    helpers.wait_all(procs)
  assert procs[0].returncode == watchdog.WATCHDOG_EXIT_CODE, err[-3000:]
  assert re.search(r"Watchdog: waited \d+s for (train step \d+|the metrics of "
                   r"steps \d+\.\.\d+) \(limit \d+s: max\(watchdog_floor_seconds=3", err)
  assert "Thread 0x" in err and "File " in err  # Every thread's stack.
  print(f"\nstopped peer detected after {time.time() - start:.1f}s")


@pytest.mark.slow
def test_sigterm_to_one_process_stops_the_job_at_one_step(two_by_two, data_flag,
                                                          tmp_path):
  """SIGTERM to process 1 only: both processes stop at the same step,
  checkpoint it and exit 143; the relaunched job ends as an uninterrupted one."""
  workdir = str(tmp_path / "terminated")
  procs = helpers.start_processes(helpers.main_command(workdir, data_flag, *RUN_FLAGS), 2, 2)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while not os.path.exists(metrics) and time.time() < deadline:
    time.sleep(0.01)
  procs[1].send_signal(signal.SIGTERM)
  results = helpers.wait_all(procs, timeout=120)
  steps = set()
  for rc, err in results:
    assert rc == termination.TERMINATED_EXIT_CODE, err[-3000:]
    steps.update(re.findall(r"Stopped on SIGTERM at step (\d+)", err))
  assert len(steps) == 1, steps
  step = int(steps.pop())
  assert step < 40 and os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))
  results = _run_job(workdir, data_flag, 2, 2)
  assert all(f"Resumed from checkpoint at step {step}." in err for _, err in results)
  for name in ("metrics.jsonl", "grad_norms.jsonl"):
    assert (helpers.without_timing(helpers.read_jsonl(os.path.join(workdir, name)))
            == helpers.without_timing(helpers.read_jsonl(os.path.join(two_by_two[0], name))))


@pytest.mark.slow
def test_sigterm_ends_a_process_blocked_in_a_collective_at_its_deadline(data_flag, tmp_path):
  procs = _start_long_job(str(tmp_path / "sigterm"), data_flag,
                          "--config.preemption_deadline_seconds=2")
  procs[1].send_signal(signal.SIGSTOP)  # Process 0 waits for it in a collective.
  try:
    start = time.time()
    procs[0].send_signal(signal.SIGTERM)
    _, err = procs[0].communicate(timeout=60)
    seconds = time.time() - start
  finally:
    for p in procs:
      p.send_signal(signal.SIGKILL)
      p.send_signal(signal.SIGCONT)
    helpers.wait_all(procs)
  assert procs[0].returncode == termination.TERMINATED_EXIT_CODE, err[-3000:]
  assert "Still running 2 s after SIGTERM" in err, err[-3000:]
  assert "Thread 0x" in err and "File " in err  # Every thread's stack.
  # The main thread waits for the stopped peer: for the device results of a
  # step that needs it (a log step's metrics), or for its stop step.
  main_stack = next(block for block in err.split("\n\n")
                    if "in train_and_evaluate" in block)
  assert re.search(r"in device_get\n.*train\.py.* in _record\n"
                   r"|preemption\.py.* in _agree\n", main_stack), main_stack
  print(f"\nSIGTERM to exit of a blocked process: {seconds:.2f}s (deadline 2 s)")


def test_a_job_that_cannot_connect_fails_loudly(tmp_path, data_flag):
  port = helpers.free_port()
  command = helpers.main_command(str(tmp_path / "run"), data_flag) + [
      f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
      "--process_id=1", "--distributed_timeout_seconds=3"]
  result = subprocess.run(command, cwd=helpers.REPO, env=helpers.subprocess_env(2),
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert f"process 0 (the coordinator at 127.0.0.1:{port}) did not accept" in result.stderr
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("case,expected", [
    ("late", "barrier 'probe_late': process(es) [1] did not arrive within 2s"),
    ("differ", "barrier 'probe_differ': process 0 has '20', but process 1 has '30'"),
])
def test_barriers_name_the_process_at_fault(case, expected):
  command = [sys.executable, "-m", "tests.multihost_barrier_probe", f"--case={case}"]
  procs = helpers.start_processes(command, 2, 1)
  outputs = [p.communicate(timeout=120)[0] for p in procs]
  assert expected in outputs[0]
  if case == "differ":
    assert expected in outputs[1]


@pytest.mark.slow
def test_hosts_read_disjoint_shards_of_every_split(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  command = [sys.executable, "-m", "tests.multihost_input_probe",
             f"--data_dir={tmp_path / 'data'}"]
  reports = []
  procs = helpers.start_processes(command, 3, 1)
  for p in procs:
    out, err = p.communicate(timeout=180)
    assert p.returncode == 0, err[-3000:]
    line = next(l for l in out.splitlines() if l.startswith("INDICES "))
    reports.append(json.loads(line[len("INDICES "):]))
  train = [set(r["train"]) for r in reports]
  assert sum(len(r["train"]) for r in reports) == 203  # Each example once per epoch.
  assert not (train[0] & train[1] or train[0] & train[2] or train[1] & train[2])
  assert set().union(*train) == set(range(203))
  assert len({r["eval_batches"] for r in reports}) == 1  # Same count on every host.
  assert sorted(i for r in reports for i in r["eval_seen"]) == list(range(61))
