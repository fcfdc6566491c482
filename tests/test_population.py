"""Populations: trials trained as one compiled program, each with the records
and results it would have trained alone (in-process, 4 simulated devices)."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import helpers
from tuning_playbook.common import records
from tuning_playbook.training import population
from tuning_playbook.training import train
from tuning_playbook import workload as workload_lib

MNIST1D_CNN = os.path.join(helpers.REPO, "configs", "mnist1d_cnn.py")
MNIST1D_MLP = os.path.join(helpers.REPO, "configs", "mnist1d_mlp.py")


def _tiny(**overrides):
  return helpers.load_config(**overrides)


def _cnn(**overrides):
  base = {"max_train_steps": 60, "eval_every_steps": 20, "log_every_steps": 10,
          "data.batches_per_transfer": 8, "optimizer.warmup_steps": 6}
  return helpers.load_config(MNIST1D_CNN, **{**base, **overrides})


def _mlp(**overrides):
  """A one-layer MNIST-1D MLP, 30 steps."""
  base = {"model.width": 32, "model.depth": 1, "batch_size": 32,
          "max_train_steps": 30, "eval_every_steps": 10, "log_every_steps": 5,
          "data.batches_per_transfer": 8}
  return helpers.load_config(MNIST1D_MLP, **{**base, **overrides})


def _rows(workdir, name=records.METRICS_FILE):
  return helpers.without_timing(helpers.read_jsonl(os.path.join(workdir, name)))


def _board_steps(workdir):
  """{TensorBoard tag: [steps]} of a work directory's event file."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  board = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0})
  board.Reload()
  return {tag: [e.step for e in board.Tensors(tag)] for tag in board.Tags()["tensors"]}


def _file_names(workdir):
  """The trainer's files (a study's runner files left out)."""
  study_files = {records.RUNNER_FILE, records.LOCK_FILE, records.LOG_FILE}
  return sorted({"events" if n.startswith("events.out.tfevents.") else n
                 for n in os.listdir(workdir) if n not in study_files})


_PROGRESS_TAGS = ("steps_per_sec", "uptime")


def _assert_same_records(population_dir, alone_dir, rtol, examples_off=0,
                         resumed=False, atol=1e-6):
  """`atol`: the absolute tolerance of the metrics; `examples_off`: how many
  eval examples may be scored differently (an argmax near a tie, under
  batched kernels' rounding); `resumed`: the population was interrupted and
  resumed (TensorBoard then holds the steps logged twice, and CLU's progress
  scalars restart their clock)."""
  # The same files, and the same TensorBoard tags at the same steps
  # (CLU's progress scalars steps_per_sec and uptime included).
  assert _file_names(population_dir) == _file_names(alone_dir)
  got_board, want_board = _board_steps(population_dir), _board_steps(alone_dir)
  status = helpers.read_json(os.path.join(alone_dir, records.SUMMARY_FILE))["status"]
  if status == records.DIVERGED:
    # A diverged trial stops when the fetch of its divergent log step
    # arrives, which may be after the next log step's progress call (the
    # fetch runs behind training): CLU's progress scalars of those steps
    # depend on timing, the metrics do not.
    for board in (got_board, want_board):
      for tag in _PROGRESS_TAGS:
        board.pop(tag, None)
  assert set(got_board) == set(want_board)
  if not resumed:
    assert got_board == want_board
  got, want = _rows(population_dir), _rows(alone_dir)
  assert [r["step"] for r in got] == [r["step"] for r in want]
  for g, w in zip(got, want):
    assert set(g) == set(w), (g.keys(), w.keys())
    for key in w:
      key_atol = atol
      if examples_off and key.startswith("eval") and key.endswith(
          ("accuracy", "error_rate", "num_correct")):
        split = key.rsplit("/", 1)[0]
        key_atol = examples_off * (1 if key.endswith("num_correct")
                                   else 1 / w[f"{split}/num_examples"])
      np.testing.assert_allclose(g[key], w[key], rtol=rtol, atol=key_atol,
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


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
  """`alone(config)`: the work directory of `config` trained alone, trained
  once per test process and module (tests only read it)."""
  root = tmp_path_factory.mktemp("alone")
  trained = {}

  def train_alone(config):
    key = json.dumps(records.config_to_dict(config), sort_keys=True, default=str)
    if key not in trained:
      workdir = str(root / str(len(trained)))
      train.train_and_evaluate(config, workdir)
      trained[key] = workdir
    return trained[key]
  return train_alone


def _train_population(configs, root, mode):
  dirs = [str(root / f"p{i}") for i in range(len(configs))]
  workloads = [train.validate_before_compiling(c) for c in configs]
  summaries = train.Trainer(configs, dirs, workloads, mode=mode).run()
  return dirs, summaries


# Batched (vmap) kernels round differently from the single-trial ones. With
# one batch per trial (two seeds) the difference grows from the second
# transfer on (on this 2-core machine 3e-5 of a gradient norm at step 9, 0.9%
# by step 33, at learning rate 0.1): both modes are checked on a run of 20
# steps after the warmups (3 to 5 transfers of 8 batches), against the same
# trials alone.
CNN_STEPS = 20


@pytest.mark.parametrize("mode,rtol,examples_off",
                         [("unroll", 1e-5, 0), ("vmap", 1e-2, 5)])
@pytest.mark.slow
def test_population_follows_each_trial_alone(tmp_path, alone, mode, rtol,
                                             examples_off):
  # Different learning rates and momenta, warmups of different lengths
  # (prepended: different last steps), two seeds (own init and data order),
  # and one trial that diverges at once and must stop alone.
  steps = CNN_STEPS
  length = {"max_train_steps": steps, "eval_every_steps": steps // 3}
  configs = [
      _cnn(**length, **{"optimizer.learning_rate": 0.1, "optimizer.warmup_steps": 6}),
      _cnn(**length, **{"optimizer.learning_rate": 0.03, "optimizer.momentum": 0.8,
                        "optimizer.warmup_steps": 0}),
      _cnn(**length, **{"optimizer.learning_rate": 0.1, "seed": 7,
                        "optimizer.warmup_steps": 13}),
      _cnn(**length, **{"optimizer.learning_rate": 1e4}),
  ]
  dirs, summaries = _train_population(configs, tmp_path, mode)
  assert [s["status"] for s in summaries] == ["completed"] * 3 + ["diverged"]
  assert [s["final_step"] for s in summaries[:3]] == [steps + 6, steps, steps + 13]
  for d in dirs[:3]:  # CLU's progress scalars (alone's steps: checked below).
    assert "steps_per_sec" in _board_steps(d)
  for i, config in enumerate(configs):
    _assert_same_records(dirs[i], alone(config), rtol, examples_off)


@pytest.mark.slow
def test_population_with_dropout_and_batch_norm_follows_alone(tmp_path, alone):
  # Trials that differ in learning rate and seed.
  configs = [_tiny(**{"optimizer.learning_rate": lr, "seed": seed,
                      "model.use_batch_norm": True})
             for lr, seed in ((0.05, 0), (0.02, 3))]
  dirs, _ = _train_population(configs, tmp_path, "unroll")
  for i, config in enumerate(configs):
    _assert_same_records(dirs[i], alone(config), 1e-5)


# Trials of the features users turn on, each case two trials that differ in
# learning rate (and seed, where the input allows it). Unrolled on CPU each
# trial runs the single-trial kernels: measured, the records agree to 1 ulp
# of float32 (1.1e-7 relative); the bound leaves about 8 ulps.
EXACT_RTOL, EXACT_ATOL = 1e-6, 1e-9
FEATURE_CASES = {
    "ema": [_tiny(**{"ema_decay": 0.9, "optimizer.learning_rate": lr, "seed": s})
            for lr, s in ((0.05, 0), (0.02, 1))],
    # Norms start near 0.8 and fall below 0.4: some steps clip, some not.
    "clipping": [_tiny(**{"grad_clip_norm": 0.5, "optimizer.learning_rate": lr,
                          "seed": s}) for lr, s in ((0.05, 0), (0.1, 1))],
    "bfloat16": [_mlp(**{"compute_dtype": "bfloat16",
                         "optimizer.learning_rate": lr, "seed": s})
                 for lr, s in ((0.01, 0), (0.003, 1))],
    # No in-memory copy: a tf.data stream (the trials share its seed).
    "tf_data": [_tiny(**{"data.cache": False, "optimizer.learning_rate": lr})
                for lr in (0.05, 0.02)],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(FEATURE_CASES))
def test_population_with_a_feature_follows_each_trial_alone(tmp_path, alone, case):
  configs = FEATURE_CASES[case]
  dirs, summaries = _train_population(configs, tmp_path, "unroll")
  assert [s["status"] for s in summaries] == ["completed"] * len(configs)
  workload = train.validate_before_compiling(configs[0])
  if case == "tf_data":
    assert population.seed_shapes_data(configs[0], workload)
    other_seed = _tiny(**{"data.cache": False, "seed": 1})
    assert (population.structure_key(other_seed, workload)
            != population.structure_key(configs[0], workload))
  for i, config in enumerate(configs):
    alone_dir = alone(config)
    _assert_same_records(dirs[i], alone_dir, EXACT_RTOL, atol=EXACT_ATOL)
    rows = _rows(alone_dir)
    if case == "ema":
      assert "eval_ema/validation/loss" in rows[-1]
    if case == "clipping":  # The bound acts, and not on every step.
      fractions = [r["train/clipped_fraction"] for r in rows]
      assert max(fractions) > 0 and min(fractions) < 1, fractions
    if case == "bfloat16":
      for workdir in (dirs[i], alone_dir):
        summary = helpers.read_json(os.path.join(workdir, records.SUMMARY_FILE))
        assert summary["perf"]["compute_dtype"] == "bfloat16"


def test_population_checkpoints_are_each_trials_own_state(tmp_path, alone):
  configs = [_tiny(**{"optimizer.learning_rate": lr}) for lr in (0.05, 0.02)]
  dirs, summaries = _train_population(configs, tmp_path, "unroll")
  step = summaries[1]["final_step"]
  restored = []
  for workdir in (dirs[1], alone(configs[1])):
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
  np.testing.assert_allclose(learning_rates, [0.05, 0.02], rtol=1e-6)


def test_population_resumes_from_its_checkpoints_as_alone(tmp_path, alone):
  # A population interrupted after its eval at step 20 (every trial's
  # checkpoint at 20, logs beyond it) resumes to the same records as trials
  # trained alone without interruption. (Trials of two seeds and learning
  # rates.)
  configs = [_tiny(seed=1), _tiny(**{"optimizer.learning_rate": 0.02})]
  dirs = [str(tmp_path / f"p{i}") for i in range(2)]
  workloads = [train.validate_before_compiling(c) for c in configs]
  trainer = train.Trainer(configs, dirs, workloads, mode="unroll")
  # Killed after step 25 of 40: no summary, logs past the last checkpoint.
  assert trainer.train(25) == [None, None]
  assert trainer.finish() == [None, None]
  for d in dirs:
    assert not os.path.exists(os.path.join(d, records.SUMMARY_FILE))
    assert helpers.read_jsonl(os.path.join(d, records.METRICS_FILE))[-1]["step"] == 25
    assert sorted(os.listdir(os.path.join(d, records.CHECKPOINTS_DIR))) == ["10", "20"]
  train.Trainer(configs, dirs, workloads, mode="unroll").run()
  for i, config in enumerate(configs):
    _assert_same_records(dirs[i], alone(config), 1e-5, resumed=True)


def test_trial_of_an_interrupted_population_resumes_alone_with_main(tmp_path, alone):
  configs = [_tiny(**{"optimizer.learning_rate": lr}) for lr in (0.05, 0.02)]
  dirs = [str(tmp_path / f"p{i}") for i in range(2)]
  workloads = [train.validate_before_compiling(c) for c in configs]
  trainer = train.Trainer(configs, dirs, workloads, mode="unroll")
  trainer.train(20)
  # Stopped before their last step: checkpoints written, no summary.
  assert trainer.finish() == [None, None]
  assert not os.path.exists(os.path.join(dirs[1], records.SUMMARY_FILE))
  # tuning_playbook.main alone, in a fresh process, picks the trial up.
  result = helpers.run_main(dirs[1], "--config.optimizer.learning_rate=0.02")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resumed from checkpoint at step 20" in result.stderr
  _assert_same_records(dirs[1], alone(configs[1]), 1e-4, resumed=True)


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
  workloads = [train.validate_before_compiling(c) for c in configs]
  with pytest.raises(population.PopulationError, match="separate populations"):
    train.Trainer(configs, [str(tmp_path / "a"), str(tmp_path / "b")], workloads)
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


VIT = os.path.join(helpers.REPO, "configs", "imagenet_vit.py")


def _tiny_vit(**overrides):
  """A one-block ViT on 32x32 synthetic images (nothing to download)."""
  base = {"model.variant": "Ti/16", "model.depth": 1, "model.hidden_size": 32,
          "model.num_heads": 2, "model.mlp_dim": 64, "model.image_size": 32,
          "model.num_classes": 10, "data.synthetic": True, "batch_size": 4,
          "eval_batch_size": 4, "max_train_steps": 6, "eval_every_steps": 3,
          "log_every_steps": 3, "optimizer.warmup_steps": 0,
          "optimizer.learning_rate": 3e-2, "compute_dtype": "float32"}
  return helpers.load_config(VIT, **{**base, **overrides})


@pytest.mark.slow
def test_every_population_of_a_worker_trains_its_own_loss(tmp_path, alone):
  # Two populations of one worker differ in a value the workload's loss reads
  # (label smoothing): each trial's records are those of the trial alone,
  # not those of the first population's loss.
  from tuning_playbook import study_worker  # pylint: disable=g-import-not-at-top
  configs = [_tiny_vit(seed=s, **{"model.label_smoothing": ls})
             for ls in (0.0, 0.9) for s in (1, 2)]
  trials = [study_worker._Trial(str(tmp_path / f"t{i}"), c)
            for i, c in enumerate(configs)]
  assert study_worker.Worker(trials, vectorize=2).run() == 4
  # The last trial of the second population (a first population that
  # trains as its trials alone: test_a_worker_groups_trials_...).
  _assert_same_records(trials[3].trial_dir, alone(configs[3]), 1e-5)
  smoothed, plain = _rows(trials[2].trial_dir), _rows(trials[0].trial_dir)
  assert abs(smoothed[-1]["train/loss"] - plain[-1]["train/loss"]) > 0.1


def test_trials_differing_in_dropout_rate_share_one_program(tmp_path, alone):
  # The tiny workload declares model.dropout_rate traced: three rates (0
  # included, where a plain rate skips the mask) train as one program, each
  # with the records of the trial alone.
  configs = [_tiny(seed=seed, **{"model.dropout_rate": rate})
             for seed, rate in ((0, 0.0), (1, 0.1), (0, 0.3))]
  workloads = [train.validate_before_compiling(c) for c in configs]
  assert population.refusal(configs, workloads) is None
  dirs = [str(tmp_path / f"p{i}") for i in range(3)]
  trainer = train.Trainer(configs, dirs, workloads, mode="unroll")
  assert trainer.programs.train_step is not None
  assert list(trainer.hyperparams) == ["model.dropout_rate"]
  trainer.run()
  assert trainer.train_step._cache_size() == 1  # pylint: disable=protected-access
  for i, config in enumerate(configs):
    _assert_same_records(dirs[i], alone(config), 1e-5)
  rates = [_rows(d)[-1]["train/loss"] for d in dirs]
  assert len(set(rates)) == 3


@pytest.mark.slow
def test_a_worker_groups_trials_differing_in_label_smoothing_and_dropout(tmp_path,
                                                                         alone):
  # ViT trials that differ in label smoothing, dropout rate and seed train
  # as one population of a study worker, each as it trains alone. (The
  # second is the last trial of test_every_population_of_a_worker_...)
  from tuning_playbook import study_worker  # pylint: disable=g-import-not-at-top
  configs = [_tiny_vit(seed=seed, **{"model.label_smoothing": ls,
                                     "model.dropout_rate": rate})
             for seed, ls, rate in ((1, 0.0, 0.3), (2, 0.9, 0.0))]
  trials = [study_worker._Trial(str(tmp_path / f"t{i}"), c)
            for i, c in enumerate(configs)]
  assert study_worker.Worker(trials, vectorize=2).run() == 2
  for i, config in enumerate(configs):
    runner = helpers.read_json(os.path.join(trials[i].trial_dir, "runner.json"))
    assert runner["population"] == [t.trial_dir for t in trials]
    _assert_same_records(trials[i].trial_dir, alone(config), 1e-5)
