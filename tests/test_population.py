"""Populations: trials trained as one compiled program, each with the records
and results it would have trained alone (in-process, 4 simulated devices)."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import helpers
from tuning_playbook import population
from tuning_playbook import records
from tuning_playbook import train
from tuning_playbook import workload as workload_lib

MNIST1D_CNN = os.path.join(helpers.REPO, "configs", "mnist1d_cnn.py")


def _tiny(**overrides):
  return helpers.load_config(**overrides)


def _cnn(**overrides):
  base = {"max_train_steps": 60, "eval_every_steps": 20, "log_every_steps": 10,
          "data.batches_per_transfer": 8, "optimizer.warmup_steps": 6}
  return helpers.load_config(MNIST1D_CNN, **{**base, **overrides})


def _rows(workdir, name=records.METRICS_FILE):
  return helpers.without_timing(helpers.read_jsonl(os.path.join(workdir, name)))


def _assert_same_records(population_dir, alone_dir, rtol):
  got, want = _rows(population_dir), _rows(alone_dir)
  assert [r["step"] for r in got] == [r["step"] for r in want]
  for g, w in zip(got, want):
    assert set(g) == set(w), (g.keys(), w.keys())
    for key in w:
      np.testing.assert_allclose(g[key], w[key], rtol=rtol, atol=1e-6,
                                 err_msg=f"{key} at step {w['step']}")
  got_norms = _rows(population_dir, records.GRAD_NORMS_FILE)
  want_norms = _rows(alone_dir, records.GRAD_NORMS_FILE)
  assert len(got_norms) == len(want_norms)
  for g, w in zip(got_norms, want_norms):
    np.testing.assert_allclose(g["train/loss"], w["train/loss"], rtol=rtol)
  got_summary = helpers.read_json(os.path.join(population_dir, records.SUMMARY_FILE))
  want_summary = helpers.read_json(os.path.join(alone_dir, records.SUMMARY_FILE))
  for key in ("status", "final_step", "best_step", "total_train_steps"):
    assert got_summary[key] == want_summary[key], key
  assert (sorted(os.listdir(os.path.join(population_dir, records.CHECKPOINTS_DIR)))
          == sorted(os.listdir(os.path.join(alone_dir, records.CHECKPOINTS_DIR))))
  assert (helpers.read_json(os.path.join(population_dir, records.CONFIG_FILE))
          == helpers.read_json(os.path.join(alone_dir, records.CONFIG_FILE)))


def _train_population(configs, root, mode):
  dirs = [str(root / f"p{i}") for i in range(len(configs))]
  workload = train.validate_before_compiling(configs[0])
  summaries = population.PopulationTrainer(configs, dirs, workload, mode=mode).train()
  return dirs, summaries


@pytest.mark.parametrize("mode,rtol", [("unroll", 1e-5), ("vmap", 2e-3)])
@pytest.mark.slow
def test_population_follows_each_trial_alone(tmp_path, mode, rtol):
  # Different learning rates and momenta, warmups of different lengths
  # (prepended: different last steps), two seeds (own init and data order),
  # and one trial that diverges at once and must stop alone.
  configs = [
      _cnn(**{"optimizer.learning_rate": 0.1, "optimizer.warmup_steps": 6}),
      _cnn(**{"optimizer.learning_rate": 0.03, "optimizer.momentum": 0.8,
              "optimizer.warmup_steps": 0}),
      _cnn(**{"optimizer.learning_rate": 0.1, "seed": 7,
              "optimizer.warmup_steps": 13}),
      _cnn(**{"optimizer.learning_rate": 1e4}),
  ]
  dirs, summaries = _train_population(configs, tmp_path, mode)
  assert [s["status"] for s in summaries] == ["completed"] * 3 + ["diverged"]
  assert [s["final_step"] for s in summaries[:3]] == [66, 60, 73]
  for i, config in enumerate(configs):
    alone = str(tmp_path / f"a{i}")
    train.train_and_evaluate(config, alone)
    _assert_same_records(dirs[i], alone, rtol)


@pytest.mark.slow
def test_population_with_dropout_and_batch_norm_follows_alone(tmp_path):
  configs = [_tiny(**{"optimizer.learning_rate": lr, "seed": seed,
                      "model.use_batch_norm": True})
             for lr, seed in ((0.05, 0), (0.02, 0), (0.05, 3))]
  dirs, _ = _train_population(configs, tmp_path, "unroll")
  for i, config in enumerate(configs):
    alone = str(tmp_path / f"a{i}")
    train.train_and_evaluate(config, alone)
    _assert_same_records(dirs[i], alone, 1e-5)


def test_population_checkpoints_are_each_trials_own_state(tmp_path):
  configs = [_tiny(**{"optimizer.learning_rate": lr}) for lr in (0.05, 0.01)]
  dirs, summaries = _train_population(configs, tmp_path, "unroll")
  alone = str(tmp_path / "alone1")
  train.train_and_evaluate(configs[1], alone)
  step = summaries[1]["final_step"]
  restored = []
  for workdir in (dirs[1], alone):
    # Plain Orbax, no framework code: the trial's state and its metadata.
    path = os.path.join(workdir, records.CHECKPOINTS_DIR, str(step))
    state = ocp.StandardCheckpointer().restore(os.path.join(path, "state"))
    restored.append(state)
  got, want = (jax.tree.leaves(t) for t in restored)
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)
  learning_rates = [
      float(np.asarray(ocp.StandardCheckpointer().restore(os.path.join(
          d, records.CHECKPOINTS_DIR, str(step), "state"))["opt_state"]
                       ["hyperparams"]["learning_rate"])) for d in dirs]
  np.testing.assert_allclose(learning_rates, [0.05, 0.01], rtol=1e-6)


def test_population_resumes_from_its_checkpoints_as_alone(tmp_path):
  # A population interrupted after its eval at step 20 (every trial's
  # checkpoint at 20, logs beyond it) resumes to the same records as trials
  # trained alone without interruption.
  configs = [_tiny(**{"optimizer.learning_rate": lr}) for lr in (0.05, 0.02)]
  partial = [c.copy_and_resolve_references() for c in configs]
  dirs = [str(tmp_path / f"p{i}") for i in range(2)]
  workload = train.validate_before_compiling(configs[0])
  trainer = population.PopulationTrainer(configs, dirs, workload, mode="unroll")
  # Train 25 of the 40 steps: stop the loop by making both trials end early.
  for r in trainer.records:
    r.total_steps = 25
  trainer.train()
  for d in dirs:
    os.remove(os.path.join(d, records.SUMMARY_FILE))  # As if killed.
    assert helpers.read_jsonl(os.path.join(d, records.METRICS_FILE))[-1]["step"] == 25
  # Checkpoint 25 is the interrupted run's last: drop it, as a kill before it.
  for d in dirs:
    ckpt = os.path.join(d, records.CHECKPOINTS_DIR)
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(os.path.join(ckpt, "25"))
  del partial
  population.PopulationTrainer(configs, dirs, workload, mode="unroll").train()
  for i, config in enumerate(configs):
    alone = str(tmp_path / f"a{i}")
    train.train_and_evaluate(config, alone)
    _assert_same_records(dirs[i], alone, 1e-5)


def test_trial_of_an_interrupted_population_resumes_alone_with_main(tmp_path):
  configs = [_tiny(**{"optimizer.learning_rate": lr}) for lr in (0.05, 0.02)]
  dirs = [str(tmp_path / f"p{i}") for i in range(2)]
  workload = train.validate_before_compiling(configs[0])
  trainer = population.PopulationTrainer(configs, dirs, workload, mode="unroll")
  for r in trainer.records:
    r.total_steps = 20
  trainer.train()
  os.remove(os.path.join(dirs[1], records.SUMMARY_FILE))
  # tuning_playbook.main alone, in a fresh process, picks the trial up.
  result = helpers.run_main(dirs[1], "--config.optimizer.learning_rate=0.02")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed from checkpoint at step 20" in result.stderr
  alone = str(tmp_path / "alone")
  train.train_and_evaluate(configs[1], alone)
  _assert_same_records(dirs[1], alone, 1e-4)


def test_structure_key_groups_only_what_can_share_a_program():
  workload = workload_lib.load_workload("mnist1d_cnn", _cnn())
  key = population.structure_key(_cnn(), workload)
  for same in ({"seed": 3}, {"optimizer.learning_rate": 0.5},
               {"optimizer.warmup_steps": 17}, {"optimizer.momentum": 0.5},
               {"optimizer.weight_decay": 1e-3}):
    assert population.structure_key(_cnn(**same), workload) == key, same
  for other in ({"batch_size": 64}, {"model.features": 8},
                {"optimizer.schedule": "linear"}, {"max_train_steps": 61},
                {"grad_clip_norm": 1.0}, {"ema_decay": 0.99}):
    assert population.structure_key(_cnn(**other), workload) != key, other


def test_trials_of_another_structure_are_refused(tmp_path):
  configs = [_cnn(), _cnn(batch_size=64)]
  workload = train.validate_before_compiling(configs[0])
  with pytest.raises(population.PopulationError, match="separate populations"):
    population.PopulationTrainer(configs, [str(tmp_path / "a"), str(tmp_path / "b")],
                                 workload)
  assert not os.path.exists(tmp_path / "a")


def test_worker_records_a_failing_population_and_goes_on(tmp_path):
  # Two trials whose model code raises share a population; it fails, both
  # are recorded failed with the error, and the next population trains.
  from tuning_playbook import study_worker  # pylint: disable=g-import-not-at-top
  broken = [_tiny(workload="tests.broken_workload", **{"optimizer.learning_rate": lr})
            for lr in (0.05, 0.02)]
  good = [_tiny(**{"optimizer.learning_rate": lr}) for lr in (0.05, 0.02)]
  trials = [study_worker._Trial(str(tmp_path / f"t{i}"), c)
            for i, c in enumerate(broken + good)]
  assert study_worker.Worker(trials, vectorize=2).run() == 4
  summaries = [helpers.read_json(os.path.join(t.trial_dir, records.SUMMARY_FILE))
               for t in trials]
  assert [s["status"] for s in summaries] == ["failed", "failed",
                                              "completed", "completed"]
  assert "defect in BrokenModel.__call__" in summaries[0]["reason"]
  runner = helpers.read_json(os.path.join(trials[0].trial_dir, "runner.json"))
  assert runner["returncode"] == 1 and len(runner["population"]) == 2
  with open(os.path.join(trials[1].trial_dir, "log.txt")) as f:
    assert "Population failed" in f.read()


def test_bad_input_fails_only_the_trial_at_fault(tmp_path):
  # Of a population of three: t0's directory holds another config (refused
  # before the population is built), t1's metrics.jsonl is unreadable (the
  # population is refused as it opens the logs, and its trials train one by
  # one). Only those two fail, each with its own message; t2 completes.
  from tuning_playbook import study_worker  # pylint: disable=g-import-not-at-top
  configs = [_tiny(**{"optimizer.learning_rate": lr}) for lr in (0.05, 0.03, 0.02)]
  trials = [study_worker._Trial(str(tmp_path / f"t{i}"), c)
            for i, c in enumerate(configs)]
  os.makedirs(trials[0].trial_dir)
  records.check_or_write_config(trials[0].trial_dir, _tiny(batch_size=8), write=True)
  os.makedirs(trials[1].trial_dir)
  with open(os.path.join(trials[1].trial_dir, records.METRICS_FILE), "w") as f:
    f.write('not json\n{"step": 1}\n')
  assert study_worker.Worker(trials, vectorize=3).run() == 3
  runners = [helpers.read_json(os.path.join(t.trial_dir, "runner.json")) for t in trials]
  assert [r["returncode"] for r in runners] == [2, 2, 0]
  assert "holds a run with another config" in runners[0]["error"]
  assert "batch_size" in runners[0]["error"]
  assert records.METRICS_FILE in runners[1]["error"]
  summary = helpers.read_json(os.path.join(trials[2].trial_dir, records.SUMMARY_FILE))
  assert summary["status"] == "completed"
  with open(os.path.join(trials[2].trial_dir, "log.txt")) as f:
    assert "training its trials one by one" in f.read()
  # The records at fault are left as they were.
  assert helpers.read_json(os.path.join(trials[0].trial_dir, records.CONFIG_FILE))[
      "batch_size"] == 8
  with open(os.path.join(trials[1].trial_dir, records.METRICS_FILE)) as f:
    assert f.read() == 'not json\n{"step": 1}\n'
