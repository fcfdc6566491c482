"""Each finding of the study analysis fires on a study built to show it, and
stays quiet on the clean control study; the instability procedures' analyses
name the spikes, stalls and divergence planted in their trials' losses."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest

from tests import analysis_fixtures as fx
from tuning_playbook.analysis import bootstrap
from tuning_playbook.analysis.findings import Thresholds
from tuning_playbook.analysis import report
from tuning_playbook.analysis import study_data
from tuning_playbook import procedures

THRESHOLDS = Thresholds()


def analyse(study_dir):
  study = study_data.load_study(study_dir)
  return study, report.analyse(study, THRESHOLDS,
                               procedures.report_hook(study)).findings


def by_kind(findings):
  out = {}
  for f in findings:
    out.setdefault(f.kind, []).append(f)
  return out


def warnings(findings):
  return sorted({f.kind for f in findings if f.severity == "warning"})


def build(tmp_path, name, indices=(), **changes):
  return fx.modified_study(str(tmp_path / name), name, indices, **changes)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
  return analyse(fx.clean_study(str(tmp_path_factory.mktemp("clean"))))


def test_clean_study_has_only_info_findings(clean):
  _, findings = clean
  assert warnings(findings) == []
  assert {f.kind for f in findings} == {
      "infeasible", "best_step_fraction", "curves_ok", "clipping_threshold",
      "sampling"}
  for f in findings:
    assert f.severity == "info" and f.message
    json.dumps(f.to_json(), allow_nan=False)  # Machine-readable as it is.


def test_clean_study_loads_every_trial(clean):
  study, _ = clean
  assert len(study.trials) == 10
  assert [t.status for t in study.trials].count("completed") == 9
  assert study.trials[9].status == "diverged" and study.trials[9].infeasible
  assert study.best_trial().trial_id == "0000"
  assert study.objective == study_data.Objective("eval/validation/error_rate", "min")
  assert [d.name for d in study.scientific_dimensions()] == ["model.activation"]


@pytest.mark.parametrize("position,side", [(0.97, "max"), (0.03, "min")])
def test_near_boundary_names_dimension_and_side(tmp_path, position, side):
  study, findings = analyse(build(tmp_path, f"edge_{side}", [0], lr_position=position))
  hits = by_kind(findings)["near_boundary"]
  assert [f.id for f in hits] == [f"near_boundary/optimizer.learning_rate/{side}"]
  details = hits[0].details
  assert details["best_trial"] == "0000" and details["side"] == side
  assert details["position"] == pytest.approx(position, abs=1e-9)
  assert not details["infeasible_beyond"]
  bound = 1.0 if side == "max" else 1e-3
  assert details["bound"] == bound
  # The suggestion moves the bound outwards, a quarter of the log range.
  expected = bound * (10 ** 0.75 if side == "max" else 10 ** -0.75)
  assert details["suggested_bound"] == pytest.approx(expected)
  word = "above" if side == "max" else "below"
  assert f"extend the range {word}" in hits[0].message
  assert warnings(findings) == ["near_boundary"]


def test_near_boundary_on_reverse_log_scale(tmp_path):
  # Momentum 1 - x is log-uniform; position 0.96 is close to 0.999.
  _, findings = analyse(build(tmp_path, "momentum", [0], momentum_position=0.96))
  (hit,) = by_kind(findings)["near_boundary"]
  assert hit.details["dimension"] == "optimizer.momentum"
  assert hit.details["side"] == "max"
  assert hit.details["value"] == pytest.approx(fx.dimension_value(
      "optimizer.momentum", 0.96))
  assert 0.999 < hit.details["suggested_bound"] < 1


def test_near_boundary_with_only_infeasible_trials_beyond(tmp_path):
  specs = fx.clean_specs()
  specs[0].lr_position = 0.93
  specs[9].lr_position = 0.97  # The diverged trial.
  _, findings = analyse(fx.write_study(str(tmp_path / "s"), specs))
  (hit,) = by_kind(findings)["near_boundary"]
  assert hit.details["infeasible_beyond"] and hit.details["trials_beyond"] == ["0009"]
  assert "unstable" in hit.message


def test_near_boundary_quiet_when_only_poor_trials_are_at_the_edge(tmp_path):
  _, findings = analyse(build(tmp_path, "poor_edge", [7, 8], lr_position=0.99))
  assert "near_boundary" not in by_kind(findings)
  assert warnings(findings) == []


def test_overfitting_in_best_trials_is_a_warning(tmp_path):
  _, findings = analyse(build(tmp_path, "overfit", [0, 1, 2, 3], shape="overfit"))
  (hit,) = by_kind(findings)["overfitting"]
  assert hit.severity == "warning"
  assert set(hit.details["best_trials"]) == {"0000", "0001", "0002", "0003"}
  for evidence in hit.details["best_trials"].values():
    # The curve rises 0.15 * 0.6 = 0.09 after step 400 (minus noise).
    assert 0.06 < evidence["rise"] < 0.1
    assert evidence["best_step"] <= 450
  assert "regularization" in hit.message


def test_overfitting_only_outside_the_best_trials_is_info(tmp_path):
  _, findings = analyse(build(tmp_path, "overfit_other", [8], shape="overfit"))
  (hit,) = by_kind(findings)["overfitting"]
  assert hit.severity == "info"
  assert hit.details["best_trials"] == {} and list(hit.details["all_trials"]) == ["0008"]
  assert warnings(findings) == []


def test_late_variance(tmp_path):
  _, findings = analyse(build(tmp_path, "noisy", [0, 1, 2, 3], shape="noisy"))
  (hit,) = by_kind(findings)["late_variance"]
  noisy = hit.details["trials"]
  assert set(noisy) >= {"0000", "0001"}
  assert set(noisy) <= {"0000", "0001", "0002", "0003"}
  for evidence in noisy.values():
    assert max(evidence["relative_noise"].values()) > THRESHOLDS.late_noise


def test_aggressive_clipping(tmp_path):
  _, findings = analyse(build(tmp_path, "clip", range(9), grad_clip_norm=0.8))
  (hit,) = by_kind(findings)["aggressive_clipping"]
  # Norms are >= ~1 everywhere, so nearly every step exceeds 0.8.
  assert all(f > 0.9 for f in hit.details["trials"].values())
  assert "reduce the learning rate" in hit.message


def test_mild_clipping_is_not_aggressive(tmp_path):
  _, findings = analyse(build(tmp_path, "clip_mild", range(9), grad_clip_norm=1.7))
  assert "aggressive_clipping" not in by_kind(findings)
  (suggestion,) = by_kind(findings)["clipping_threshold"]
  for stats in suggestion.details["trials"].values():
    assert stats["configured_threshold"] == 1.7
    assert 0 < stats["fraction_clipped_configured"] < THRESHOLDS.aggressive_clip_fraction


def test_clipping_threshold_is_the_90th_percentile(clean, tmp_path):
  study, findings = clean
  (suggestion,) = by_kind(findings)["clipping_threshold"]
  best = study.best_trial()
  with open(os.path.join(best.run_dir, "grad_norms.jsonl")) as f:
    norms = np.array([json.loads(line)["train/grad_norm"] for line in f])
  assert suggestion.details["trial"] == best.trial_id
  assert suggestion.details["suggested_threshold"] == pytest.approx(
      np.percentile(norms, 90))
  assert suggestion.details["fraction_clipped"] == pytest.approx(
      np.mean(norms > np.percentile(norms, 90)))
  assert 0.09 <= suggestion.details["fraction_clipped"] <= 0.11


def test_gradient_spikes(tmp_path):
  _, findings = analyse(build(tmp_path, "spiky", [0, 1], grads="spiky"))
  (hit,) = by_kind(findings)["gradient_outliers"]
  assert set(hit.details["trials"]) == {"0000", "0001"}
  assert all(len(steps) == 5 for steps in hit.details["trials"].values())


def test_falling_gradient_norms_are_not_spikes(tmp_path):
  study, findings = analyse(build(tmp_path, "decaying", [0, 1], grads="decaying"))
  steps, norms = study.trials[0].grad_norms
  assert norms[:10].mean() > 100 * norms[-10:].mean()
  assert "gradient_outliers" not in by_kind(findings)


def test_best_step_early(tmp_path):
  _, findings = analyse(build(tmp_path, "early", range(9), shape="early"))
  kinds = by_kind(findings)
  (hit,) = kinds["best_step_early"]
  assert hit.details["max"] <= THRESHOLDS.early_best_step_fraction
  assert "max_train_steps" in hit.message and "best_step_late" not in kinds


def test_best_step_late_and_still_improving(tmp_path):
  _, findings = analyse(build(tmp_path, "late", range(9), shape="late"))
  kinds = by_kind(findings)
  (late,) = kinds["best_step_late"]
  assert late.details["late_share"] == 1.0
  (improving,) = kinds["still_improving"]
  for evidence in improving.details["trials"].values():
    # 0.4 * a * 0.25 of a total improvement of ~a (a = 0.9 - best).
    assert evidence["fraction_of_improvement"] > THRESHOLDS.still_improving
  assert "best_step_early" not in kinds and "saturated" not in kinds


def test_saturated_early(tmp_path):
  _, findings = analyse(build(tmp_path, "saturated", range(9), shape="saturated"))
  kinds = by_kind(findings)
  (hit,) = kinds["saturated"]
  for evidence in hit.details["trials"].values():
    assert evidence["fraction"] <= THRESHOLDS.saturation_fraction
    assert set(evidence["saturation_steps"]) == {"validation", "train"}
  assert "still_improving" not in kinds and "overfitting" not in kinds


def test_not_enough_trials(tmp_path):
  specs = fx.clean_specs()
  for i in (1, 2, 3):
    specs[i].best = 0.18 + 0.01 * i
  study, findings = analyse(fx.write_study(str(tmp_path / "s"), specs))
  (hit,) = by_kind(findings)["not_enough_trials"]
  assert hit.details["good_trials"] == 1
  assert hit.details["miss_probability"] == pytest.approx((1 - 1 / 10) ** 10)
  assert "sampling" not in by_kind(findings)


def test_a_procedure_study_leaves_out_the_checks_that_do_not_apply(tmp_path):
  # The study of test_not_enough_trials, as a seed_variance study's reruns.
  specs = fx.clean_specs()
  for i in (1, 2, 3):
    specs[i].best = 0.18 + 0.01 * i
  study_dir = fx.write_study(str(tmp_path / "s"), specs)
  path = os.path.join(study_dir, "study.json")
  with open(path) as f:
    record = json.load(f)
  record["procedure"] = {"name": "seed_variance", "parameters": {}}
  with open(path, "w") as f:
    json.dump(record, f)
  _, findings = analyse(study_dir)
  kinds = by_kind(findings)
  assert "not_enough_trials" not in kinds
  (note,) = kinds["procedure_checks"]
  assert note.details == {"procedure": "seed_variance", "left_out": {
      "not_enough_trials": "reruns of the same hyperparameters, not a sample "
                           "of a search space"}}
  assert "not_enough_trials (reruns of the same hyperparameters" in note.message
  assert "infeasible" in kinds  # The other general checks still run.


def test_the_report_hook_carries_the_procedures_analysis_and_left_out_checks(
    tmp_path):
  study_dir = fx.clean_study(str(tmp_path / "s"))
  study = study_data.load_study(study_dir)
  assert procedures.report_hook(study) is None  # An ordinary study.
  _update_json(os.path.join(study_dir, "study.json"),
               procedure={"name": "lr_sweep", "parameters": {}})
  hook = procedures.report_hook(study_data.load_study(study_dir))
  module = procedures.load("lr_sweep")
  assert hook == report.ProcedureHook("lr_sweep", module.analyze,
                                      module.GENERAL_CHECKS_LEFT_OUT)


def test_a_study_of_an_unknown_procedure_gets_the_general_report(tmp_path):
  study_dir = fx.clean_study(str(tmp_path / "s"))
  _update_json(os.path.join(study_dir, "study.json"),
               procedure={"name": "no_such_procedure", "parameters": {}})
  study = study_data.load_study(study_dir)
  hook = procedures.report_hook(study)
  assert hook.analyze is None
  assert hook.error.startswith("unknown procedure 'no_such_procedure'")
  result = report.write_report(study, procedure=hook)
  (unknown,) = [f for f in result.findings if f.kind == "procedure"]
  assert unknown.id == "procedure/unknown" and unknown.severity == "warning"
  assert hook.error in unknown.message
  general = report.analyse(study, THRESHOLDS).findings
  assert [f.id for f in result.findings] == ["procedure/unknown"] + [
      f.id for f in general]


def test_enough_trials_in_the_clean_study(clean):
  _, findings = clean
  (hit,) = by_kind(findings)["sampling"]
  good = hit.details["good_trials"]
  assert good == 4  # The four trials within 0.2 of the way to the median.
  assert hit.details["miss_probability"] == pytest.approx((1 - good / 10) ** 10)


def test_infeasible_fraction_and_region(clean, tmp_path):
  _, findings = clean
  (few,) = by_kind(findings)["infeasible"]
  assert few.severity == "info" and few.details["fraction"] == pytest.approx(0.1)
  regions = {(r["dimension"], r["side"]) for r in few.details["regions"]}
  assert ("optimizer.learning_rate", "above") in regions

  _, findings = analyse(build(tmp_path, "many", range(3, 9), shape="diverged"))
  (many,) = by_kind(findings)["infeasible"]
  assert many.severity == "warning"
  assert many.details["fraction"] == pytest.approx(0.7)
  assert many.details["statuses"] == {"diverged": 7}


def test_unfinished_and_unstarted_trials_are_reported(tmp_path):
  specs = fx.clean_specs()
  specs[4].shape = "unfinished"
  specs.append(fx.TrialSpec(0.5, 0.5, "relu", 0.3, shape="no_start"))
  study, findings = analyse(fx.write_study(str(tmp_path / "s"), specs))
  (hit,) = by_kind(findings)["unfinished"]
  assert hit.details["trials"]["0010"] == ["log.txt"]
  assert "metrics.jsonl" in hit.details["trials"]["0004"]
  assert study.trials[10].status == "unfinished"
  assert "0010 (log.txt)" in hit.message


def test_failed_trial_is_infeasible(tmp_path):
  _, findings = analyse(build(tmp_path, "failed", [5], shape="failed"))
  (hit,) = by_kind(findings)["infeasible"]
  assert hit.details["statuses"] == {"diverged": 1, "failed": 1}
  assert hit.details["reasons"] == ["RuntimeError: out of memory",
                                    "loss is NaN at step 281"]


def test_torn_and_missing_records_are_tolerated(tmp_path):
  study_dir = fx.clean_study(str(tmp_path / "s"))
  with open(os.path.join(study_dir, "trials", "0001", "metrics.jsonl"), "a") as f:
    f.write('{"step": 1001, "train/lo')  # A write cut short.
  os.remove(os.path.join(study_dir, "trials", "0000", "grad_norms.jsonl"))
  study, findings = analyse(study_dir)
  (problems,) = by_kind(findings)["record_problems"]
  assert "missing grad_norms.jsonl" in problems.details["trials"]["0000"]
  assert any("unreadable line" in p for p in problems.details["trials"]["0001"])
  # Gradient norms fall back to the per-interval means of metrics.jsonl.
  steps, norms = study.trials[0].grad_norms
  assert len(steps) == fx.MAX_STEPS // fx.EVAL_EVERY and np.all(np.isfinite(norms))
  (suggestion,) = by_kind(findings)["clipping_threshold"]
  assert suggestion.details["trials"]["0000"]["step_resolution"] is False


def test_dimension_positions():
  log = study_data.Dimension("lr", "log", 1e-3, 1.0)
  assert log.position(0.031622776601683794) == pytest.approx(0.5)
  rev = study_data.Dimension("m", "reverse_log", 0.9, 0.999)
  assert rev.position(0.99) == pytest.approx(0.5)
  assert rev.value_at(rev.position(0.97)) == pytest.approx(0.97)
  integer = study_data.Dimension("w", "int_linear", 0, 4)
  assert integer.position(1) == pytest.approx(0.25)
  assert study_data.Dimension("c", "categorical", values=("a",)).position("a") is None


def test_bootstrap_resamples_with_replacement():
  values = [1.0, 2.0, 3.0, math.inf]
  result = bootstrap.best_of_budgets(values, [1, 4], samples=4000, seed=0)
  one = result.best[1]
  assert np.isnan(one).mean() == pytest.approx(0.25, abs=0.03)
  assert set(np.unique(one[np.isfinite(one)])) == {1.0, 2.0, 3.0}
  four = result.best[4]
  # P(no 1.0 among 4 draws) = 0.75 ** 4.
  assert np.mean(four > 1.0) == pytest.approx(0.75 ** 4, abs=0.03)
  assert bootstrap.budgets(10) == [1, 2, 3, 4, 6, 8, 10]


def test_input_bound_trials_are_named_with_their_wait_share(tmp_path):
  study_dir = build(tmp_path, "input_bound", [1, 4], input_wait=0.5)
  study, findings = analyse(study_dir)
  (finding,) = by_kind(findings)["input_bound"]
  assert finding.severity == "warning"
  assert set(finding.details["trials"]) == {"0001", "0004"}
  for trial_id in ("0001", "0004"):
    wait = finding.details["trials"][trial_id]
    fractions = [r["perf/input_wait_fraction"] for r in study.trials[int(trial_id)].metrics]
    assert wait["mean"] == pytest.approx(np.mean(fractions))
    assert wait["max"] == pytest.approx(np.max(fractions))
    assert wait["threshold"] == THRESHOLDS.input_wait_fraction
    assert f"{trial_id} ({100 * wait['mean']:.0f}% (max" in finding.message
  assert "data.prefetch_batches" in finding.message
  json.dumps(finding.to_json(), allow_nan=False)
  # The leaderboard shows every trial's wait share, the finding sits beside it.
  result = report.write_report(study_data.load_study(study_dir))
  with open(result.index_html) as f:
    page = f.read()
  leaderboard = page[page.index('id="leaderboard"'):]
  assert "input wait" in leaderboard and "Input-bound: 0001" in leaderboard
  share = finding.details["trials"]["0004"]["mean"]
  assert f"{100 * share:.0f}% (max" in leaderboard


def test_a_trial_threshold_from_its_config_wins(tmp_path):
  study_dir = build(tmp_path, "strict", [2], input_wait=0.1)
  _, findings = analyse(study_dir)
  assert "input_bound" not in by_kind(findings)  # 10% < the default 20%.
  path = os.path.join(study_dir, "trials", "0002", "config.json")
  with open(path) as f:
    config = json.load(f)
  config["input_bound_warning_fraction"] = 0.05
  with open(path, "w") as f:
    json.dump(config, f)
  _, findings = analyse(study_dir)
  (finding,) = by_kind(findings)["input_bound"]
  assert list(finding.details["trials"]) == ["0002"]
  assert finding.details["thresholds"] == [0.05]


def test_training_loss_increasing_names_trials_and_steps(tmp_path):
  study, findings = analyse(build(tmp_path, "rising", [0, 3], loss="rising"))
  (hit,) = by_kind(findings)["training_loss_increasing"]
  assert hit.severity == "warning" and "bug" in hit.message
  assert set(hit.details["trials"]) == {"0000", "0003"}
  for trial_id, evidence in hit.details["trials"].items():
    # The loss climbs from ~0.4 after 40% of training (step 400).
    assert 400 <= evidence["start_step"] <= 650
    assert evidence["end_step"] == fx.MAX_STEPS
    steps, losses = study.trials[int(trial_id)].step_losses
    late = np.median(losses[steps > 950])
    assert evidence["peak"] == pytest.approx(late, rel=0.1)
    assert evidence["rise"] > 0.4
    assert f"{trial_id}: " in hit.message and f"step {evidence['start_step']}" in hit.message
  # Ending near 1.7 against the others' 0.06, they are infeasible-like too.
  assert warnings(findings) == ["infeasible_like", "training_loss_increasing"]
  assert set(by_kind(findings)["infeasible_like"][0].details["trials"]) == {"0000", "0003"}
  assert hit.command is None


@pytest.mark.parametrize("loss", ["noisy_flat", "warmup_bump"])
def test_training_loss_check_ignores_noise_and_a_warmup_bump(tmp_path, loss):
  _, findings = analyse(build(tmp_path, loss, range(9), loss=loss))
  assert "training_loss_increasing" not in by_kind(findings)


def test_clean_study_has_no_commands(clean):
  _, findings = clean
  assert all(f.command is None for f in findings)


def _sweep(study_dir, *extra):
  return " ".join(["python -m tuning_playbook.sweep --config=configs/synthetic.py",
                   f"--study_dir={study_dir}", *extra])


def _playbook(procedure, study_dir, suffix, *extra):
  return " ".join([f"python -m tuning_playbook.playbook {procedure}",
                   "--config=configs/synthetic.py",
                   f"--study_dir={study_dir}_{suffix}",
                   f"--from_study={study_dir}", *extra, "--run"])


def test_boundary_command_widens_the_search_space(tmp_path):
  study_dir = build(tmp_path, "edge", [0], lr_position=0.97)
  _, findings = analyse(study_dir)
  (hit,) = by_kind(findings)["near_boundary"]
  assert hit.command == _playbook("next_round", study_dir, "widened", "--widen")
  assert hit.to_json()["command"] == hit.command


def test_boundary_with_infeasible_trials_beyond_suggests_the_instability_check(
    tmp_path):
  specs = fx.clean_specs()
  specs[0].lr_position = 0.93
  specs[9].lr_position = 0.97
  study_dir = fx.write_study(str(tmp_path / "s"), specs)
  _, findings = analyse(study_dir)
  (hit,) = by_kind(findings)["near_boundary"]
  assert hit.command == _playbook("instability_check", study_dir, "instability")


def test_late_best_step_and_still_improving_suggest_round_2(tmp_path):
  study_dir = build(tmp_path, "late", range(9), shape="late")
  _, findings = analyse(study_dir)
  kinds = by_kind(findings)
  expected = _playbook("next_round", study_dir, "x2", "--steps_factor=2")
  assert kinds["best_step_late"][0].command == expected
  assert kinds["still_improving"][0].command == expected
  assert kinds["best_step_late"][0].details["steps_factor"] == 2


def test_early_best_step_suggests_fewer_steps(tmp_path):
  study_dir = build(tmp_path, "early", range(9), shape="early")
  study, findings = analyse(study_dir)
  (hit,) = by_kind(findings)["best_step_early"]
  latest = max(t.best_step for t in study.feasible_trials())
  steps = hit.details["suggested_max_train_steps"]
  assert 2 * latest <= steps < 2.2 * latest and steps < fx.MAX_STEPS
  assert hit.command == _sweep(f"{study_dir}_steps{steps}", "--num_trials=10",
                               "--seed=0", f"--config.max_train_steps={steps}",
                               "--run")


def test_not_enough_trials_suggests_the_same_sweep_with_more_trials(tmp_path):
  specs = fx.clean_specs()
  for i in (1, 2, 3):
    specs[i].best = 0.18 + 0.01 * i
  study_dir = fx.write_study(str(tmp_path / "s"), specs)
  _, findings = analyse(study_dir)
  (hit,) = by_kind(findings)["not_enough_trials"]
  # One good trial in 10: (1 - 0.1)^n <= 0.05 needs n = 29.
  assert hit.details["suggested_num_trials"] == 29
  assert hit.command == _sweep(study_dir, "--num_trials=29", "--seed=0", "--run")


def test_aggressive_clipping_suggests_the_clip_override(tmp_path):
  study_dir = build(tmp_path, "clip", range(9), grad_clip_norm=0.8)
  _, findings = analyse(study_dir)
  (hit,) = by_kind(findings)["aggressive_clipping"]
  (suggestion,) = by_kind(findings)["clipping_threshold"]
  value = float(f"{suggestion.details['suggested_threshold']:.3g}")
  assert hit.details["suggested_grad_clip_norm"] == value
  assert hit.command == _sweep(f"{study_dir}_clip", "--num_trials=10", "--seed=0",
                               f"--config.grad_clip_norm={value!r}", "--run")


def test_gradient_spikes_suggest_the_instability_check(tmp_path):
  study_dir = build(tmp_path, "spiky", [0, 1], grads="spiky")
  _, findings = analyse(study_dir)
  (hit,) = by_kind(findings)["gradient_outliers"]
  assert hit.command == _playbook("instability_check", study_dir, "instability")


def test_commands_follow_the_sweep_command_in_the_tracking_table(tmp_path):
  study_dir = build(tmp_path, "clip", range(9), grad_clip_norm=0.8)
  recorded = (f"python -m tuning_playbook.sweep --config=configs/synthetic.py "
              f"--study_dir={study_dir} --num_trials=10 --seed=3 "
              f"--config.batch_size=64 --config.grad_clip_norm=0.8 --run")
  with open(tmp_path / "studies.csv", "w") as f:
    f.write(f"study,study_dir,command\nclip,{study_dir},{recorded}\n")
  _, findings = analyse(study_dir)
  (hit,) = by_kind(findings)["aggressive_clipping"]
  value = hit.details["suggested_grad_clip_norm"]
  assert hit.command == recorded.replace(
      f"--study_dir={study_dir} ", f"--study_dir={study_dir}_clip ").replace(
          "grad_clip_norm=0.8", f"grad_clip_norm={value!r}")
  # The report shows the command beside the finding.
  result = report.write_report(study_data.load_study(study_dir))
  with open(result.index_html) as f:
    page = f.read()
  assert f"<code>{hit.command}</code>" in page
  with open(result.findings_json) as f:
    payload = json.load(f)
  (entry,) = [e for e in payload["findings"] if e["kind"] == "aggressive_clipping"]
  assert entry["command"] == hit.command


# The instability procedures' analyses on planted per-step losses.


def _decay(steps):
  return 0.5 + 2.0 * np.exp(-np.asarray(steps, dtype=float) / 100.0)


def _update_json(path, **changes):
  with open(path) as f:
    record = json.load(f)
  for key, value in changes.items():
    if isinstance(value, dict):
      record.setdefault(key, {}).update(value)
    else:
      record[key] = value
  with open(path, "w") as f:
    json.dump(record, f)


def _procedure_study(study_dir, procedure, parameters, trials):
  """A study planned by `procedure`, one fixture trial per (optimizer config,
  per-step training loss) of `trials`; a trial whose loss turns NaN diverged
  there."""
  fx.write_study(study_dir, [fx.TrialSpec(0.5, 0.5, "relu", 0.1)] * len(trials))
  for i, (optimizer, losses) in enumerate(trials):
    run_dir = os.path.join(study_dir, "trials", f"{i:04d}")
    _update_json(os.path.join(run_dir, "config.json"), optimizer=optimizer)
    with open(os.path.join(run_dir, "grad_norms.jsonl"), "w") as f:
      for step, loss in enumerate(losses, start=1):
        f.write(json.dumps({"step": step, "train/grad_norm": 1.0,
                            "train/loss": float(loss)}) + "\n")
    bad = np.flatnonzero(~np.isfinite(losses))
    if len(bad):
      _update_json(os.path.join(run_dir, "summary.json"), status="diverged",
                   final_step=int(bad[0]) + 1)
  _update_json(os.path.join(study_dir, "study.json"),
               procedure={"name": procedure, "parameters": parameters})
  return study_data.load_study(study_dir)


def _procedure_findings(study, name):
  found, section = procedures.load(name).analyze(study, lambda *args: None)
  assert section.id == name
  return {f.id: f for f in found}


def test_instability_check_names_the_planted_faults(tmp_path):
  steps = np.arange(1, 1001)
  spiky = _decay(steps)
  spiky[399] = 5.0  # Step 400.
  diverged = _decay(steps)
  diverged[299:] = np.nan  # Step 300 on.
  # Down to 1.2 at step 550, then up again: 20 windows of 45 steps after
  # the first 10%; the lowest ends at step 550 (median 1.288, at step 528),
  # the last (median 2.912, at step 978) at step 1000.
  rising = np.where(steps <= 550, 3.0 - 0.004 * (steps - 100),
                    1.2 + 0.004 * (steps - 550))
  study_dir = str(tmp_path / "s")
  study = _procedure_study(
      study_dir, "instability_check",
      {"best_learning_rate": 0.1, "steps": 1000, "eval_every": 1000,
       "lr_factors": [1.5, 2.0, 3.0, 4.0, 6.0]},
      [({"learning_rate": 0.15}, _decay(steps)),
       ({"learning_rate": 0.2}, spiky),
       ({"learning_rate": 0.3}, np.full(1000, 2.3)),  # Stalled.
       ({"learning_rate": 0.4}, rising),
       ({"learning_rate": 0.6}, diverged)])
  result = _procedure_findings(study, "instability_check")[
      "instability_check/result"]
  details = result.details
  assert result.severity == "warning"
  rows = {r["trial_id"]: r for r in details["trials"]}
  assert [rows[t]["unstable"] for t in sorted(rows)] == [
      False, True, True, True, True]
  assert details["unstable_trials"] == ["0001", "0002", "0003", "0004"]
  assert details["unstable_learning_rate"] == 0.2
  assert details["unstable_factor"] == 2.0
  (spike,) = rows["0001"]["spikes"]
  reference = (_decay(394) + _decay(395)) / 2  # Steps 390-399, falling.
  assert (spike["step"], spike["last_step"], spike["peak"]) == (400, 400, 5.0)
  assert spike["size"] == pytest.approx(5.0 / reference)
  assert details["first_spike_step"] == 400
  assert details["max_spike_size"] == pytest.approx(5.0 / reference)
  assert rows["0002"]["stalled"] and rows["0002"]["spikes"] == []
  rise = rows["0003"]["rising"]
  assert (rise["start_step"], rise["end_step"]) == (550, 1000)
  assert rise["low"] == pytest.approx(1.288)
  assert rise["peak"] == pytest.approx(2.912)
  assert rows["0003"]["spikes"] == [] and not rows["0003"]["stalled"]
  assert rows["0004"]["first_nonfinite_step"] == 300
  assert not rows["0004"]["stalled"]
  assert result.message.startswith(
      "Early instability: lr 0.2 (2x): a spike at step 400 to 5 (9.3x); "
      "lr 0.3 (3x): stalled (loss 2.3 -> 2.3); lr 0.4 (4x): loss rising from "
      "1.29 at step 550 to 2.91 by step 1000; lr 0.6 (6x): diverged at step "
      "300. The lowest unstable learning rate is 0.2 (2x the best, 0.1).")
  assert result.command == (
      "python -m tuning_playbook.playbook warmup --config=configs/synthetic.py "
      f"--study_dir={study_dir}_warmup --unstable_learning_rate=0.2 --run")


def test_instability_check_quiet_on_clean_losses(tmp_path):
  steps = np.arange(1, 501)
  study = _procedure_study(
      str(tmp_path / "s"), "instability_check",
      {"best_learning_rate": 0.1, "steps": 500, "eval_every": 1,
       "lr_factors": [2.0]},
      [({"learning_rate": 0.2}, _decay(steps))])
  result = _procedure_findings(study, "instability_check")[
      "instability_check/result"]
  assert result.severity == "info" and result.command is None
  assert result.details["early_instability"] is False
  assert result.details["unstable_learning_rate"] is None


def test_warmup_picks_the_shortest_warmup_without_spike_or_stall(tmp_path):
  steps = np.arange(1, 301)
  early_spike = _decay(steps)
  early_spike[2] = 9.0  # Step 3: above 2 x every loss before it.
  study_dir = str(tmp_path / "s")
  study = _procedure_study(
      study_dir, "warmup",
      {"unstable_learning_rate": 0.5, "lr_factor": 10.0,
       "base_learning_rate": 5.0, "warmup_steps": [0, 10, 30, 100],
       "baseline_max_train_steps": 400, "baseline_warmup_steps": 0},
      [({"learning_rate": 5.0, "warmup_steps": 0}, early_spike),
       ({"learning_rate": 5.0, "warmup_steps": 10}, np.full(300, 2.3)),
       ({"learning_rate": 5.0, "warmup_steps": 30}, _decay(steps)),
       ({"learning_rate": 5.0, "warmup_steps": 100}, _decay(steps))])
  result = _procedure_findings(study, "warmup")["warmup/result"]
  details = result.details
  rows = {r["warmup_steps"]: r for r in details["trials"]}
  assert [rows[w]["feasible"] for w in (0, 10, 30, 100)] == [
      False, False, True, True]
  assert [(s["step"], s["peak"]) for s in rows[0]["spikes"]] == [(3, 9.0)]
  assert rows[10]["stalled"] and rows[10]["spikes"] == []
  assert details["shortest_feasible_warmup"] == 30
  assert details["trial_id"] == "0002"
  assert details["fraction"] == 30 / 400
  # 7.5% of training: above the playbook's 5%, so a warning.
  assert details["above_flag_fraction"] is True and result.severity == "warning"
  assert details["override"] == "--config.optimizer.warmup_steps=30"
  # No source study recorded: the study's own trainer command, with it.
  assert result.command == (
      "python -m tuning_playbook.main --config=configs/synthetic.py "
      f"--workdir={study_dir}_baseline_warmup30 "
      "--config.optimizer.warmup_steps=30 "
      "--config.optimizer.warmup_mode=prepended")
  # With the source study recorded (one that does not search the warmup):
  # the source study's sweep again, with it.
  source = fx.clean_study(str(tmp_path / "source"))
  _update_json(os.path.join(study_dir, "study.json"), procedure={
      "name": "warmup", "parameters": {**study.procedure["parameters"],
                                       "from_study": {"study_dir": source}}})
  result = _procedure_findings(study_data.load_study(study_dir), "warmup")[
      "warmup/result"]
  assert result.command == _sweep(
      f"{source}_warmup30", "--num_trials=10", "--seed=0",
      "--config.optimizer.warmup_steps=30",
      "--config.optimizer.warmup_mode=prepended", "--run")


def test_warmup_with_no_stable_length(tmp_path):
  steps = np.arange(1, 101)
  diverged = _decay(steps)
  diverged[49:] = np.nan
  study = _procedure_study(
      str(tmp_path / "s"), "warmup",
      {"unstable_learning_rate": 0.5, "lr_factor": 10.0,
       "base_learning_rate": 5.0, "warmup_steps": [0, 10],
       "baseline_max_train_steps": 400, "baseline_warmup_steps": 0},
      [({"learning_rate": 5.0, "warmup_steps": 0}, diverged),
       ({"learning_rate": 5.0, "warmup_steps": 10}, np.full(100, 2.3))])
  result = _procedure_findings(study, "warmup")["warmup/result"]
  assert result.severity == "warning" and result.command is None
  assert result.details["shortest_feasible_warmup"] is None
  rows = {r["warmup_steps"]: r for r in result.details["trials"]}
  assert rows[0]["first_nonfinite_step"] == 50 and rows[10]["stalled"]
  assert result.message.startswith("No warmup up to 10 steps keeps training")


def _with_dimension(study_dir, name, spec, values):
  """The study with one more searched dimension: trial i took values[i]."""
  path = os.path.join(study_dir, "study.json")
  with open(path) as f:
    record = json.load(f)
  record["search_space"][name] = spec
  for trial, value in zip(record["trials"], values):
    trial["params"][name] = value
  with open(path, "w") as f:
    json.dump(record, f)
  return study_dir


# Positions in the new range: the two best trials (0000 overall, 0001 of
# gelu) at the low end, the others spread above them.
SPREAD = [0.02, 0.05, 0.5, 0.3, 0.7, 0.15, 0.6, 0.4, 0.8, 0.2]


@pytest.mark.parametrize("name,spec,values,limit", [
    # A range that starts at 0, the lowest value the key can take.
    ("model.dropout_rate", {"scale": "linear", "min": 0.0, "max": 0.5},
     [0.5 * p for p in SPREAD], "model.dropout_rate cannot go below 0"),
    # Warmup up to 10% of training (1000 steps), the best trial near the top.
    ("optimizer.warmup_steps", {"scale": "int_linear", "min": 0, "max": 100},
     [round(100 * (1 - p)) for p in SPREAD],
     "a warmup longer than 10% of training (1000 steps) is past the "
     "playbook's guidance"),
])
def test_a_bound_at_its_natural_limit_is_not_to_be_widened(tmp_path, name, spec,
                                                           values, limit):
  study_dir = _with_dimension(fx.clean_study(str(tmp_path / "s")), name, spec, values)
  _, findings = analyse(study_dir)
  (hit,) = by_kind(findings)["near_boundary"]
  assert hit.details["dimension"] == name
  assert hit.details["suggested_bound"] is None
  assert hit.details["natural_limit"] == limit
  assert hit.severity == "info" and hit.command is None
  assert "cannot extend" in hit.message and limit in hit.message
  assert "e.g. to" not in hit.message
  assert warnings(findings) == []
  from tuning_playbook.procedures import next_round  # pylint: disable=g-import-not-at-top
  from tuning_playbook.procedures import from_study  # pylint: disable=g-import-not-at-top
  with pytest.raises(procedures.ProcedureError, match="nothing to widen"):
    next_round.widened_space(from_study.Source.load(study_dir), THRESHOLDS)


def test_warmup_is_widened_up_to_ten_percent_of_training(tmp_path):
  # A range up to 5% of 1000 steps, its best trial at the top: the suggestion
  # stops at 10% (100 steps), not a quarter of the range past it, 125 being
  # what an uncapped step would give from a range of 0..100.
  values = [round(50 * (1 - p)) for p in SPREAD]
  study_dir = _with_dimension(fx.clean_study(str(tmp_path / "s")),
                              "optimizer.warmup_steps",
                              {"scale": "int_linear", "min": 0, "max": 50}, values)
  _, findings = analyse(study_dir)
  (hit,) = by_kind(findings)["near_boundary"]
  assert hit.details["side"] == "max" and hit.severity == "warning"
  assert hit.details["suggested_bound"] == 63  # 50 + 12.5, rounded up.
  study_dir = _with_dimension(fx.clean_study(str(tmp_path / "t")),
                              "optimizer.warmup_steps",
                              {"scale": "int_linear", "min": 0, "max": 90},
                              [round(90 * (1 - p)) for p in SPREAD])
  _, findings = analyse(study_dir)
  (hit,) = by_kind(findings)["near_boundary"]
  assert hit.details["suggested_bound"] == 100
  assert "e.g. to 100" in hit.message


def _set_eval_every(study_dir, every):
  for trial in sorted(os.listdir(os.path.join(study_dir, "trials"))):
    path = os.path.join(study_dir, "trials", trial, "config.json")
    if os.path.exists(path):
      with open(path) as f:
        config = json.load(f)
      config["eval_every_steps"] = every
      with open(path, "w") as f:
        json.dump(config, f)
  return study_dir


@pytest.mark.parametrize("every,early,late", [(110, True, False), (200, True, True),
                                              (100, False, False)])
def test_evals_too_sparse_for_the_best_step_rules_are_named(tmp_path, every, early,
                                                            late):
  # 1000 steps: the 10% rule needs an eval by step 100; the last 25% (steps
  # 751-1000) needs two evals, one every 125 steps at most.
  study_dir = _set_eval_every(fx.clean_study(str(tmp_path / "s")), every)
  _, findings = analyse(study_dir)
  found = by_kind(findings).get("eval_cadence", [])
  if not (early or late):
    assert found == []
    return
  (hit,) = found
  assert hit.severity == "info"
  assert ("no best step can fall in the first 10%" in hit.message) == early
  assert ("fewer than two evals fall in the last 25%" in hit.message) == late
  assert hit.details["suggested_eval_every_steps"] == 100
  assert "--config.eval_every_steps=100 (of 1000 steps)" in hit.message


def test_loss_spikes_of_an_ordinary_study_are_named_with_the_instability_check(
    tmp_path):
  study_dir = build(tmp_path, "spikes", [0, 2], loss="mid_spike")
  _, findings = analyse(study_dir)
  (hit,) = by_kind(findings)["loss_spikes"]
  assert hit.severity == "warning"
  assert sorted(hit.details["trials"]) == ["0000", "0002"]
  for spikes in hit.details["trials"].values():
    (spike,) = spikes
    # Spike steps until the window before holds more of them than not.
    assert spike["step"] == 500 and 500 < spike["last_step"] <= 507
    assert spike["size"] > 20
  assert "0000: 1 spike(s)" in hit.message and "at step 500" in hit.message
  assert hit.command.startswith("python -m tuning_playbook.playbook instability_check")
  assert "loss_spikes" in warnings(findings)


@pytest.mark.parametrize("loss", ["falling", "noisy_flat", "warmup_bump", "rising"])
def test_no_loss_spikes_in_noise_a_warmup_bump_or_a_slow_rise(tmp_path, loss):
  _, findings = analyse(build(tmp_path, loss, range(9), loss=loss))
  assert "loss_spikes" not in by_kind(findings)


def test_the_best_trial_just_below_the_edge_of_stability_is_named(tmp_path):
  # Figure 7a: the trials with the highest learning rates diverge; the best
  # trial has the highest rate of the feasible ones.
  specs = fx.clean_specs()
  specs[0].lr_position = 0.7  # The best (0.090).
  specs[7] = dataclasses.replace(specs[7], lr_position=0.8, shape="diverged")
  study_dir = fx.write_study(str(tmp_path / "edge"), specs)
  _, findings = analyse(study_dir)
  (hit,) = by_kind(findings)["instability_edge"]
  assert hit.severity == "warning" and hit.details["best_trial"] == "0000"
  assert hit.details["infeasible_trials"] == ["0007", "0009"]
  assert hit.details["edge"] == pytest.approx(
      fx.dimension_value("optimizer.learning_rate", 0.7))
  assert "Figure 7a" in hit.message
  assert hit.command.startswith("python -m tuning_playbook.playbook instability_check")


def test_no_instability_edge_when_the_best_trial_is_far_below_it(clean, tmp_path):
  _, findings = clean  # The best at 0.5, the diverged trial above 0.75.
  assert "instability_edge" not in by_kind(findings)
  specs = fx.clean_specs()
  specs[0].lr_position = 0.45
  specs[7] = dataclasses.replace(specs[7], lr_position=0.8, shape="diverged")
  _, findings = analyse(fx.write_study(str(tmp_path / "far"), specs))
  # The edge at 0.65 (trial 0005), the best 0.2 of the range below it.
  assert "instability_edge" not in by_kind(findings)


def test_a_trial_with_an_uncharacteristically_high_loss_is_infeasible_like(tmp_path):
  # Trial 0005 finishes at a training loss near 1.5, the others near 0.06.
  _, findings = analyse(build(tmp_path, "high_loss", [5], loss="stuck_high"))
  (finding,) = by_kind(findings)["infeasible_like"]
  assert finding.severity == "warning"
  assert list(finding.details["trials"]) == ["0005"]
  final = finding.details["trials"]["0005"]["final_loss"]
  assert 1.45 < final < 1.6
  assert finding.details["trials"]["0005"]["deviations"] > 5
  assert 0.05 < finding.details["median_final_loss"] < 0.07
  assert finding.details["num_feasible"] == 9
  assert "infeasible_like" not in by_kind(
      analyse(fx.clean_study(str(tmp_path / "control")))[1])


def test_high_loss_outliers_need_both_the_factor_and_the_deviations():
  from tuning_playbook.analysis import high_loss  # pylint: disable=g-import-not-at-top
  thresholds = Thresholds()
  rng = np.random.default_rng(0)
  noisy = {f"{i:04d}": float(v) for i, v in enumerate(np.exp(rng.normal(0, 0.4, 40)))}
  assert high_loss.outliers(noisy, thresholds) == {}  # Lognormal spread alone.
  tight = {f"{i:04d}": 1.0 + 0.001 * i for i in range(8)}
  assert high_loss.outliers({**tight, "x": 2.9}, thresholds) == {}  # Under 3x.
  high = high_loss.outliers({**tight, "x": 3.5}, thresholds)
  assert list(high) == ["x"] and high["x"] > 100
  assert high_loss.outliers({"a": 1.0, "b": 1.0, "c": 1.0, "x": 50.0},
                            thresholds) == {}  # Fewer than 5 trials.
