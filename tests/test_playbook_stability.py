"""instability_check, warmup and next_round end to end on configs/mnist1d_cnn.py
(short runs, small batch), with the numbers every finding reports recomputed
here from the trials' own records; the schedule arithmetic of round 2 and the
widened search space are checked without training."""

import json
import math
import os

import numpy as np
import pytest

from tests import analysis_fixtures as fx
from tests.test_playbook_procedures import _findings, _playbook, _read_json, _run
from tuning_playbook import config_schema
from tuning_playbook import search_space as search_space_lib
from tuning_playbook.procedures import from_study
from tuning_playbook.procedures import next_round

CNN = "configs/mnist1d_cnn.py"
SHORT = ("--config.max_train_steps=60", "--config.eval_every_steps=30",
         "--config.batch_size=32", "--config.log_every_steps=10")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A 2-trial study of 60 steps: the study the procedures start from."""
  study_dir = str(tmp_path_factory.mktemp("runs") / "cnn_study")
  _run("tuning_playbook.sweep", f"--config={CNN}", f"--study_dir={study_dir}",
       "--num_trials=2", "--seed=0", *SHORT, "--run", "--parallel=2")
  return study_dir


def _losses(trial_dir):
  with open(os.path.join(trial_dir, "grad_norms.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in rows}


def _check_stability_record(row, trial_dir, window=10):
  """The record's figures against the trial's own per-step losses."""
  losses = _losses(trial_dir)
  steps = sorted(losses)
  y = np.array([losses[s] for s in steps], dtype=float)
  assert row["num_steps"] == len(y)
  finite = y[:np.argmax(~np.isfinite(y))] if not np.isfinite(y).all() else y
  assert row["first_loss"] == pytest.approx(np.median(finite[:window]))
  assert row["final_loss"] == pytest.approx(np.median(finite[-window:]))
  if row["first_nonfinite_step"] is None:
    assert row["stalled"] == (row["final_loss"] >= 0.95 * row["first_loss"])
  for spike in row["spikes"]:
    i = steps.index(spike["step"])
    assert spike["reference"] == pytest.approx(np.median(y[i - window:i]))
    peak = max(losses[s] for s in steps if spike["step"] <= s <= spike["last_step"])
    assert spike["peak"] == pytest.approx(peak)
    assert spike["size"] == pytest.approx(spike["peak"] / spike["reference"])
  assert row["unstable"] == bool(row["spikes"] or row["stalled"] or row["rising"]
                                 or row["first_nonfinite_step"] is not None)


@pytest.mark.slow
def test_instability_check(source):
  study_dir = source + "_instability"
  _playbook("instability_check", study_dir, f"--from_study={source}",
            "--steps=80", "--lr_factors=1.5,2,6", "--eval_every=1",
            "--run", "--parallel=2")
  found, payload, page = _findings(study_dir)
  result = found["instability_check/result"]
  details = result["details"]
  best = min((_read_json(os.path.join(source, "trials", t, "summary.json"))["best_value"], t)
             for t in ("0000", "0001"))[1]
  best_lr = _read_json(os.path.join(source, "trials", best, "config.json"))[
      "optimizer"]["learning_rate"]
  assert details["best_learning_rate"] == pytest.approx(best_lr)
  rows = {r["trial_id"]: r for r in details["trials"]}
  assert len(rows) == 3
  for trial_id, row in rows.items():
    trial_dir = os.path.join(study_dir, "trials", trial_id)
    config = _read_json(os.path.join(trial_dir, "config.json"))
    assert config["max_train_steps"] == 80
    assert row["learning_rate"] == pytest.approx(config["optimizer"]["learning_rate"])
    assert row["factor"] == pytest.approx(row["learning_rate"] / best_lr, rel=1e-4)
    _check_stability_record(row, trial_dir)
    with open(os.path.join(trial_dir, "metrics.jsonl")) as f:
      evals = [json.loads(l) for l in f if "eval/validation/loss" in l]
    # The 2x trial is evaluated at every step (a prepended warmup included),
    # the others at step 80 and at the end.
    total = _read_json(os.path.join(trial_dir, "summary.json"))["total_train_steps"]
    if math.isclose(row["factor"], 2, rel_tol=1e-4):
      assert [e["step"] for e in evals] == list(range(1, total + 1))
    else:
      assert len(evals) <= 2
  unstable = sorted((r["learning_rate"], r["trial_id"]) for r in rows.values()
                    if r["unstable"])
  assert details["early_instability"] == bool(unstable)
  if unstable:
    lr = unstable[0][0]
    assert details["unstable_learning_rate"] == pytest.approx(lr)
    assert result["command"].startswith("python -m tuning_playbook.playbook warmup ")
    assert f"--from_study={source}" in result["command"]
    assert f"--unstable_learning_rate={lr!r}" in result["command"]
    spikes = [s for r in rows.values() for s in r["spikes"]]
    if spikes:
      assert details["max_spike_size"] == pytest.approx(max(s["size"] for s in spikes))
  else:
    assert "command" not in result
  assert 'id="instability_check"' in page


@pytest.mark.slow
def test_warmup(source):
  study_dir = source + "_warmup"
  _playbook("warmup", study_dir, f"--from_study={source}",
            "--unstable_learning_rate=0.05", "--lr_factor=2",
            "--warmup_steps=0,5,10", "--run", "--parallel=2")
  found, _, page = _findings(study_dir)
  result = found["warmup/result"]
  details = result["details"]
  assert details["base_learning_rate"] == pytest.approx(0.1)
  assert details["baseline_max_train_steps"] == 60
  rows = {r["warmup_steps"]: r for r in details["trials"]}
  assert sorted(rows) == [0, 5, 10]
  for w, row in rows.items():
    trial_dir = os.path.join(study_dir, "trials", row["trial_id"])
    config = _read_json(os.path.join(trial_dir, "config.json"))
    summary = _read_json(os.path.join(trial_dir, "summary.json"))
    assert config["optimizer"]["warmup_steps"] == w
    assert config["optimizer"]["learning_rate"] == pytest.approx(0.1)
    # post_warmup_steps = 2 x warmup (the control as long as the longest trial).
    assert config["max_train_steps"] == (2 * w if w else 30)
    assert summary["total_train_steps"] == config["max_train_steps"] + w
    _check_stability_record(row, trial_dir)
    assert row["feasible"] == (summary["status"] == "completed" and not row["unstable"])
  feasible = [w for w, r in rows.items() if r["feasible"]]
  if feasible:
    w = min(feasible)
    assert details["shortest_feasible_warmup"] == w
    assert details["fraction"] == pytest.approx(w / 60)
    assert details["above_flag_fraction"] == (w / 60 > 0.05)
    assert details["override"] == f"--config.optimizer.warmup_steps={w}"
    # The source searches the warmup: its best trial's command, with it.
    assert f"--config.optimizer.warmup_steps={w}" in result["command"]
    assert f"--workdir={source}_warmup{w}" in result["command"]
  else:
    assert details["shortest_feasible_warmup"] is None
  assert 'id="warmup"' in page


@pytest.mark.slow
def test_next_round_trains_the_best_trial_longer(source):
  study_dir = source + "_x2"
  _playbook("next_round", study_dir, f"--from_study={source}",
            "--steps_factor=2", "--run")
  found, _, _ = _findings(study_dir)
  details = found["next_round/longer"]["details"]
  (trial,) = os.listdir(os.path.join(study_dir, "trials"))
  config = _read_json(os.path.join(study_dir, "trials", trial, "config.json"))
  summary = _read_json(os.path.join(study_dir, "trials", trial, "summary.json"))
  assert config["max_train_steps"] == 120 and details["new"]["max_train_steps"] == 120
  assert details["best_value"] == pytest.approx(summary["best_value"])
  source_best = min(_read_json(os.path.join(source, "trials", t, "summary.json"))[
      "best_value"] for t in ("0000", "0001"))
  assert details["source_best_value"] == pytest.approx(source_best)
  assert details["improved"] == (summary["best_value"] < source_best)
  assert details["best_step_fraction"] == pytest.approx(
      summary["best_step"] / summary["total_train_steps"])


@pytest.mark.parametrize("schedule,hold,decay,expected", [
    ("linear", 0, 0, {"optimizer.hold_steps": 1000, "optimizer.decay_steps": 1000}),
    ("linear", 200, 0, {"optimizer.hold_steps": 1200, "optimizer.decay_steps": 800}),
    ("linear", 0, 600, {"optimizer.hold_steps": 1000, "optimizer.decay_steps": 600}),
    ("cosine", 100, 0, {"optimizer.hold_steps": 200, "optimizer.decay_steps": 0}),
    ("cosine", 0, 900, {"optimizer.hold_steps": 0, "optimizer.decay_steps": 1800}),
    ("constant", 0, 0, {}),
])
def test_round_2_schedules(schedule, hold, decay, expected):
  config = config_schema.base_config()
  config.max_train_steps = 1000
  config.optimizer.schedule = schedule
  config.optimizer.hold_steps = hold
  config.optimizer.decay_steps = decay
  assert next_round.longer_schedule(config, 2.0) == {"max_train_steps": 2000,
                                                     **expected}


def test_widen_moves_the_flagged_bound_out(tmp_path):
  study_dir = fx.modified_study(str(tmp_path / "edge"), "edge", [0], lr_position=0.97)
  path = os.path.join(study_dir, "study.json")
  record = _read_json(path)
  record.update(config_overrides={}, sampler={"algorithm": "quasi_random"},
                scientific={}, fixed={"optimizer.name": "momentum"}, base_config={})
  with open(path, "w") as f:
    json.dump(record, f)
  source = from_study.Source.load(study_dir)
  config = config_schema.base_config()
  plan = next_round.plan(config, {"steps_factor": None, "widen": True,
                                  "num_trials": None}, source)
  space = plan.search_space
  lr = space["nuisance"]["optimizer.learning_rate"]
  assert lr["max"] == pytest.approx(10 ** 0.75) and lr["min"] == 1e-3
  assert space["nuisance"]["optimizer.momentum"] == {
      "scale": "reverse_log", "min": 0.8, "max": 0.999}
  assert space["scientific"]["model.activation"]["values"] == ["relu", "gelu"]
  assert space["fixed"] == {"optimizer.name": "momentum"}
  assert plan.num_trials == 10
  assert plan.parameters["widened"] == {"optimizer.learning_rate": {
      "side": "max", "old_bound": 1.0, "new_bound": pytest.approx(10 ** 0.75)}}
  search_space_lib.parse(space)
  with pytest.raises(Exception, match="exactly one"):
    next_round.plan(config, {"steps_factor": 2.0, "widen": True,
                             "num_trials": None}, source)
