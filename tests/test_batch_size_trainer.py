"""The batch_size procedure with the real trainer (tuning_playbook.main).

tests/test_playbook_procedures.py runs the procedure against
tests/fake_trainer.py, whose throughput and out-of-memory errors are made up;
here the figures come from the trainer's own summary.json, and an
out-of-memory error is XLA's own.
"""

import csv
import json
import os
import subprocess
import sys

import pytest

from tests import helpers
from tuning_playbook.common import records
from tuning_playbook.procedures import batch_size
from tuning_playbook.training import run

BATCH_SIZES = (16, 32)
STEPS = 20


def _run(module, *args):
  result = subprocess.run([sys.executable, "-m", module, *args], cwd=helpers.REPO,
                          env=helpers.subprocess_env(1), capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]


def _trial_files(study_dir):
  """{batch size: (trial id, config.json, summary.json, metrics.jsonl)}."""
  with open(os.path.join(study_dir, "results.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  assert [r["status"] for r in rows] == ["completed"] * len(BATCH_SIZES)
  trials = {}
  for row in rows:
    trial_dir = os.path.join(study_dir, "trials", row["trial_id"])
    config = helpers.read_json(os.path.join(trial_dir, "config.json"))
    trials[config["batch_size"]] = (
        row["trial_id"], config, helpers.read_json(os.path.join(trial_dir, "summary.json")),
        helpers.read_jsonl(os.path.join(trial_dir, "metrics.jsonl")))
  return trials


@pytest.mark.slow
def test_batch_size_reports_the_throughput_the_trainer_measured(tmp_path):
  study_dir = str(tmp_path / "batch")
  _run("tuning_playbook.playbook", "batch_size", f"--config={helpers.TINY_CONFIG}",
       f"--study_dir={study_dir}", f"--min_batch_size={BATCH_SIZES[0]}",
       f"--max_batch_size={BATCH_SIZES[-1]}", f"--steps={STEPS}", "--run")
  _run("tuning_playbook.analyze", f"--study_dir={study_dir}")
  with open(os.path.join(study_dir, "report", "findings.json")) as f:
    found = {x["id"]: x for x in json.load(f)["findings"]}
  table = {r["batch_size"]: r for r in found["batch_size/throughput"]["details"]["rows"]}
  trials = _trial_files(study_dir)
  assert sorted(table) == sorted(trials) == list(BATCH_SIZES)
  throughput = {}
  for b, (trial_id, config, summary, metrics) in trials.items():
    # Each trial trains exactly STEPS steps and evaluates once, at the end.
    assert config["max_train_steps"] == config["eval_every_steps"] == STEPS
    assert config["optimizer"]["warmup_steps"] == 0
    assert summary["final_step"] == STEPS
    assert [r["step"] for r in metrics if "eval/validation/loss" in r] == [STEPS]
    perf = summary["perf"]
    # The summary's figures are the trainer's log intervals, summed.
    timed = [r for r in metrics if "perf/examples_per_second" in r]
    steps = [r["step"] - p["step"] for p, r in zip([{"step": 0}] + timed, timed)]
    assert perf["steps_timed"] == sum(steps) == STEPS
    assert perf["seconds_timed"] == pytest.approx(sum(
        b * n / r["perf/examples_per_second"] for n, r in zip(steps, timed)), rel=1e-6)
    assert perf["examples_per_second"] == pytest.approx(
        b * perf["steps_timed"] / perf["seconds_timed"], rel=1e-9)
    # ... and the report's are the summary's.
    row = table[b]
    assert (row["trial_id"], row["fits"]) == (trial_id, "fits")
    assert row["examples_per_second"] == perf["examples_per_second"]
    assert row["steps_timed"] == perf["steps_timed"]
    assert row["seconds_timed"] == perf["seconds_timed"]
    assert row["steps_per_second"] == pytest.approx(
        perf["steps_timed"] / perf["seconds_timed"], rel=1e-12)
    assert row["seconds_per_step"] == pytest.approx(
        perf["seconds_timed"] / perf["steps_timed"], rel=1e-12)
    throughput[b] = perf["examples_per_second"]
  small, large = BATCH_SIZES
  scaling = found["batch_size/throughput_scaling"]["details"]
  assert scaling["speedups"] == pytest.approx(
      {str(large): throughput[large] / throughput[small]}, rel=1e-12)
  best = max(throughput, key=throughput.get)
  assert scaling["max_throughput_batch_size"] == best
  assert scaling["max_examples_per_second"] == throughput[best]
  assert f"--config.batch_size={best} " in found["batch_size/throughput_scaling"]["command"]
  largest = found["batch_size/largest_feasible"]["details"]
  assert largest["largest_feasible"] == large
  assert largest["does_not_fit"] == [] and largest["not_launched"] == []


def test_an_out_of_memory_error_of_the_trainer_does_not_fit(tmp_path):
  # XLA's own error: a model of 3.5e14 bytes of parameters (beyond any
  # address space, so no allocation succeeds) fails at its first allocation.
  # What the trainer records is what the procedure reads.
  config = helpers.load_config(
      os.path.join(helpers.REPO, "configs", "mnist1d_mlp.py"),
      **{"model.width": 2**41, "model.depth": 1, "data.synthetic": True,
         "batch_size": 16, "eval_batch_size": 16})
  workdir = str(tmp_path / "oom")
  with pytest.raises(Exception, match="(?i)out of memory") as error:
    run.run_trial(config, workdir)
  assert not isinstance(error.value, run.BAD_INPUT_ERRORS)
  record = records.trial_status(workdir)
  assert record["status"] == "failed"
  assert "Out of memory allocating" in record["reason"]  # XLA:CPU's words.
  assert batch_size.does_not_fit(record) and batch_size.stop_rule(record)
  # Another failure (a defect in model code) is no reason to stop.
  broken = helpers.load_config(workload="tests.broken_workload")
  with pytest.raises(RuntimeError, match="defect in BrokenModel"):
    try:
      run.run_trial(broken, str(tmp_path / "broken"))
    except RuntimeError as e:
      summary = run.failed_summary(broken, e)  # What a trainer records.
      raise
  assert not batch_size.does_not_fit(summary)
  assert "RuntimeError: defect in BrokenModel" in summary["reason"]
