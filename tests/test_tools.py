"""The benchmark and the profiling tool run end to end on a tiny config."""

import glob
import json
import re
import subprocess
import sys

import pytest

from tests import helpers


def _run(args, tmp_path, *overrides):
  data = f"--config.data.data_dir={tmp_path / 'data'}"
  return subprocess.run([sys.executable, *args, f"--config={helpers.TINY_CONFIG}", data,
                         *overrides],
                        cwd=helpers.REPO, env=helpers.subprocess_env(2),
                        capture_output=True, text=True, timeout=300)


def test_step_overhead_prints_a_measured_ratio(tmp_path):
  result = _run(["benchmarks/step_overhead.py", "--steps_per_round=20", "--rounds=2",
                 "--cadence_steps=60"],
                tmp_path, "--config.data.batches_per_transfer=4")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert re.fullmatch(r"ratio=\d+\.\d{3}", lines[-1])
  by_prefix = {line.split(":")[0]: line for line in lines if ":" in line}
  framework = [float(x) for x in by_prefix["framework steps/s per round"].split(":")[1].split()]
  bare = [float(x) for x in by_prefix["bare steps/s per round"].split(":")[1].split()]
  assert len(framework) == len(bare) == 2 and min(framework + bare) > 0
  ratio = (framework[0] / bare[0] + framework[1] / bare[1]) / 2
  assert abs(float(lines[-1][6:]) - ratio) < 1e-2
  fractions = dict(line.split("=") for line in lines if line.endswith(
      tuple("0123456789")) and line.split("=")[0].endswith("_fraction"))
  assert set(fractions) == {"eval_fraction", "checkpoint_fraction"}
  assert all(0 < float(x) < 1 for x in fractions.values())


def test_trace_steps_writes_a_trace(tmp_path):
  trace_dir = tmp_path / "trace"
  result = _run(["xprof/trace_steps.py", f"--trace_dir={trace_dir}", "--warmup_steps=3",
                 "--traced_steps=3"], tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert glob.glob(str(trace_dir / "plugins" / "profile" / "*" / "*.xplane.pb"))


@pytest.mark.slow
def test_profile_steps_of_a_run_and_the_trace_summary(tmp_path):
  workdir = tmp_path / "run"
  result = helpers.run_main(str(workdir), f"--config.data.data_dir={tmp_path / 'data'}",
                            "--config.profile_steps=3:5", "--config.max_train_steps=10")
  assert result.returncode == 0, result.stderr[-3000:]
  profile = workdir / "profile"
  assert glob.glob(str(profile / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert glob.glob(str(profile / "plugins" / "profile" / "*" / "perfetto_trace.json.gz"))
  assert helpers.read_json(str(profile / "steps.json"))["first_step"] == 3
  summarize = [sys.executable, "xprof/summarize_trace.py", f"--trace_dir={profile}"]
  text = subprocess.run(summarize, cwd=helpers.REPO, env=helpers.subprocess_env(1),
                        capture_output=True, text=True, timeout=120)
  assert text.returncode == 0, text.stderr[-3000:]
  assert "steps found: 3 executions of jit_step_in_loop (steps 3..5)" in text.stdout
  as_json = subprocess.run(summarize + ["--json"], cwd=helpers.REPO,
                           env=helpers.subprocess_env(1), capture_output=True,
                           text=True, timeout=120)
  summary = json.loads(as_json.stdout)
  assert summary["steps"]["count"] == 3 and summary["steps"]["labels"] == [3, 4, 5]
  timed = {name: c["time_us"] for name, c in summary["categories"].items() if c["time_us"] > 0}
  assert {"dot", "copy"} <= set(timed)
  for name in timed:
    assert re.search(rf"^  {name} +\d+\.\d{{3}} ", text.stdout, re.M)
  idle = summary["idle_between_steps"]
  assert idle["gaps"] == 2 and idle["total_us"] >= 0 and 0 <= idle["fraction"] < 1


@pytest.mark.slow
def test_input_throughput_prints_both_pipelines_and_their_ratio():
  result = subprocess.run(
      [sys.executable, "benchmarks/input_throughput.py", "--num_images=48",
       "--batch_size=4", "--chunks_per_round=1", "--rounds=2"],
      cwd=helpers.REPO, env=helpers.subprocess_env(2), capture_output=True,
      text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  rates = {line.split(" ")[0]: [float(x) for x in line.split(":")[1].split()]
           for line in lines if "images/s per round" in line}
  assert set(rates) == {"before", "after"}
  assert all(len(r) == 2 and min(r) > 0 for r in rates.values())
  assert re.fullmatch(r"ratio=\d+\.\d{3}", lines[-1])
  ratios = sorted(a / b for a, b in zip(rates["after"], rates["before"]))
  assert abs(float(lines[-1][6:]) - sum(ratios) / 2) < 1e-2
