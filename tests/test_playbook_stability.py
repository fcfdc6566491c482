"""instability_check, warmup and next_round end to end on configs/mnist1d_cnn.py
(short runs, small batch), each on inputs whose outcome is known (learning
rates that train, stall or blow up), checked against the trials' own records;
the schedule arithmetic of round 2 and the widened search space are checked
without training. tests/test_loss_detectors.py covers the detectors on
synthetic losses."""

import json
import math
import os

import pytest

from tests import analysis_fixtures as fx
from tests.test_playbook_procedures import _findings, _playbook, _read_json, _run
from tuning_playbook import config_schema
from tuning_playbook.procedures import from_study
from tuning_playbook.procedures import next_round
from tuning_playbook.studies import search_space as search_space_lib

CNN = "configs/mnist1d_cnn.py"
SHORT = ("--config.max_train_steps=60", "--config.eval_every_steps=30",
         "--config.batch_size=32", "--config.log_every_steps=10")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A 2-trial study of 60 steps: the study the procedures start from."""
  study_dir = str(tmp_path_factory.mktemp("runs") / "cnn_study")
  _run("tuning_playbook.sweep", f"--config={CNN}", f"--study_dir={study_dir}",
       "--num_trials=2", "--seed=0", *SHORT, "--run", "--vectorize=2")
  return study_dir


def _losses(trial_dir):
  with open(os.path.join(trial_dir, "grad_norms.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["train/loss"] for r in rows}


def _by_factor(rows, factors):
  """The rows keyed by the factor (of `factors`) each ran at."""
  out = {f: r for r in rows for f in factors
         if math.isclose(r["factor"], f, rel_tol=1e-4)}
  assert len(out) == len(rows) == len(factors), rows
  return out


STABLE = {"spikes": [], "first_nonfinite_step": None, "stalled": False,
          "rising": None, "unstable": False}


@pytest.mark.slow
def test_instability_check(source):
  # 1.5x and 2x the best learning rate train; 100x blows the loss up by
  # orders of magnitude at its first update (step 3; step 1 is the source's
  # 1-step warmup, at rate 0).
  study_dir = source + "_instability"
  _playbook("instability_check", study_dir, f"--from_study={source}",
            "--steps=80", "--lr_factors=1.5,2,100", "--eval_every=1",
            "--run", "--vectorize=3")
  found, _, page = _findings(study_dir)
  result = found["instability_check/result"]
  details = result["details"]
  best = min((_read_json(os.path.join(source, "trials", t, "summary.json"))["best_value"], t)
             for t in ("0000", "0001"))[1]
  best_lr = _read_json(os.path.join(source, "trials", best, "config.json"))[
      "optimizer"]["learning_rate"]
  assert details["best_learning_rate"] == pytest.approx(best_lr)
  rows = _by_factor(details["trials"], (1.5, 2, 100))
  for factor, row in rows.items():
    trial_dir = os.path.join(study_dir, "trials", row["trial_id"])
    config = _read_json(os.path.join(trial_dir, "config.json"))
    assert config["max_train_steps"] == 80
    assert row["learning_rate"] == pytest.approx(config["optimizer"]["learning_rate"])
    assert row["learning_rate"] == pytest.approx(factor * best_lr, rel=1e-5)
    assert row["status"] == "completed"
    total = _read_json(os.path.join(trial_dir, "summary.json"))["total_train_steps"]
    assert total == 81 and row["num_steps"] == 81  # The 1-step warmup first.
    with open(os.path.join(trial_dir, "metrics.jsonl")) as f:
      evals = [json.loads(l)["step"] for l in f if "eval/validation/loss" in l]
    # The 2x trial is evaluated at every step, the others at step 80 and at
    # the end.
    assert evals == (list(range(1, 82)) if factor == 2 else [80, 81])
  for factor in (1.5, 2):
    assert {k: rows[factor][k] for k in STABLE} == STABLE, factor
  spiky = rows[100]
  losses = _losses(os.path.join(study_dir, "trials", spiky["trial_id"]))
  assert spiky["spikes"], spiky
  first = spiky["spikes"][0]
  assert first["step"] == 3 and first["size"] > 100
  assert first["reference"] == pytest.approx((losses[1] + losses[2]) / 2)
  assert first["peak"] == pytest.approx(
      max(losses[s] for s in range(3, first["last_step"] + 1)))
  assert spiky["unstable"] and spiky["first_nonfinite_step"] is None
  # The finding: 100x is the lowest unstable rate, its first spike step 3.
  assert result["severity"] == "warning"
  assert details["early_instability"] is True
  assert details["unstable_trials"] == [spiky["trial_id"]]
  assert details["unstable_learning_rate"] == spiky["learning_rate"]
  assert details["unstable_factor"] == pytest.approx(100, rel=1e-4)
  assert details["first_spike_step"] == 3
  assert details["max_spike_size"] == max(s["size"] for s in spiky["spikes"])
  assert "(100x): a spike at step 3 to" in result["message"]
  lr = spiky["learning_rate"]
  assert result["command"] == (
      "python -m tuning_playbook.playbook warmup "
      f"--config={CNN} --study_dir={study_dir}_warmup --from_study={source} "
      f"--unstable_learning_rate={lr!r} --run")
  assert 'id="instability_check"' in page
  # Trials blown up on purpose and short runs: no general "infeasible" or
  # "train longer" findings beside the procedure's own.
  kinds = {f["kind"] for f in found.values()}
  assert not kinds & {"infeasible", "best_step_late", "still_improving",
                      "not_enough_trials", "training_loss_increasing"}, kinds
  assert "infeasible" in found["procedure_checks"]["details"]["left_out"]


def _warmup_rows(study_dir, base_lr, warmups):
  """The warmup study's rows by warmup length, with each trial's schedule
  checked: the warmup, then twice as many steps (the control: as long as the
  longest trial)."""
  found, _, page = _findings(study_dir)
  result = found["warmup/result"]
  assert result["details"]["base_learning_rate"] == pytest.approx(base_lr)
  assert result["details"]["baseline_max_train_steps"] == 60
  rows = {r["warmup_steps"]: r for r in result["details"]["trials"]}
  assert sorted(rows) == warmups
  for w, row in rows.items():
    trial_dir = os.path.join(study_dir, "trials", row["trial_id"])
    config = _read_json(os.path.join(trial_dir, "config.json"))
    summary = _read_json(os.path.join(trial_dir, "summary.json"))
    assert config["optimizer"]["warmup_steps"] == w
    assert config["optimizer"]["learning_rate"] == pytest.approx(base_lr)
    assert config["max_train_steps"] == (2 * w if w else 3 * max(warmups))
    assert summary["total_train_steps"] == config["max_train_steps"] + w
    assert row["status"] == summary["status"]
  assert 'id="warmup"' in page
  return result, rows


@pytest.mark.slow
def test_warmup_cannot_save_a_rate_far_past_stable(source):
  # 10 x 1.04 = 10.4, 100x the source's best rate: without a warmup the loss
  # jumps 100-fold at step 2 and the run diverges within a few steps; a
  # 5- or 10-step warmup only delays the blow-up (the loss ends above where
  # it started). No warmup keeps the rate usable.
  study_dir = source + "_warmup"
  _playbook("warmup", study_dir, f"--from_study={source}",
            "--unstable_learning_rate=1.04", "--lr_factor=10",
            "--warmup_steps=0,5,10", "--run", "--vectorize=3")
  result, rows = _warmup_rows(study_dir, 10.4, [0, 5, 10])
  details = result["details"]
  found, _, _ = _findings(study_dir)
  kinds = {f["kind"] for f in found.values()}
  assert not kinds & {"infeasible", "best_step_late", "not_enough_trials"}, kinds
  assert [rows[w]["feasible"] for w in (0, 5, 10)] == [False, False, False]
  control = rows[0]
  assert control["status"] == "diverged" and control["unstable"]
  losses = _losses(os.path.join(study_dir, "trials", control["trial_id"]))
  assert control["spikes"], control
  first = control["spikes"][0]
  assert first["step"] == 2 and first["reference"] == pytest.approx(losses[1])
  assert first["size"] > 10
  summary = _read_json(os.path.join(study_dir, "trials", control["trial_id"],
                                    "summary.json"))
  assert control["first_nonfinite_step"] == summary["final_step"] <= 10
  for w in (5, 10):
    assert rows[w]["status"] == "completed"
    assert rows[w]["stalled"] and rows[w]["unstable"], w
  assert result["severity"] == "warning"
  assert details["shortest_feasible_warmup"] is None
  assert details["override"] is None
  assert "command" not in result
  assert result["message"].startswith("No warmup up to 10 steps keeps training")


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


def test_next_round_top_k_plans_each_of_the_best_trials_longer(source):
  # Planned only (no --run): each of the source's two trials, with its own
  # hyperparameters and schedule, at twice the length.
  study_dir = source + "_top2"
  result = _playbook("next_round", study_dir, f"--from_study={source}",
                     "--steps_factor=2", "--top_k=2")
  assert "were tuned at batch_size" not in result.stderr
  record = _read_json(os.path.join(study_dir, "study.json"))
  assert record["procedure"]["parameters"]["source_trials"] == ["0000", "0001"][
      ::1 if _best(source) == "0000" else -1]
  planned = sorted(os.listdir(os.path.join(study_dir, "trials")))
  assert len(planned) == 2
  rates = set()
  for trial in planned:
    config = _read_json(os.path.join(study_dir, "trials", trial, "config.json"))
    assert config["max_train_steps"] == 120
    rates.add(config["optimizer"]["learning_rate"])
  assert rates == {_read_json(os.path.join(source, "trials", t, "config.json"))[
      "optimizer"]["learning_rate"] for t in ("0000", "0001")}
  result = _playbook("next_round", source + "_top3", f"--from_study={source}",
                     "--steps_factor=2", "--top_k=3", expect=2)
  assert "--top_k=3" in result.stderr and "only 2 completed" in result.stderr
  # Another batch size than the source's tuned one: planned, with the
  # playbook's reason to re-tune.
  result = _playbook("next_round", source + "_b64", f"--from_study={source}",
                     "--steps_factor=2", "--config.batch_size=64")
  assert (f"--config.batch_size=64: the hyperparameters of --from_study={source} "
          "were tuned at batch_size=32, and the batch size is not a "
          "hyperparameter to tune") in result.stderr


def _best(study_dir):
  return min((_read_json(os.path.join(study_dir, "trials", t, "summary.json"))[
      "best_value"], t) for t in ("0000", "0001"))[1]


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
