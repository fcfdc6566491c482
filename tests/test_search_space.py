"""Tests of search spaces: scales, conditionals, roles, grids, presets."""

import collections
import importlib.util
import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from tuning_playbook.analysis import study_data
from tuning_playbook import config_schema
from tuning_playbook.studies import dimension
from tuning_playbook.studies import search_space as ss
from tuning_playbook.studies import search_space_file
from tuning_playbook.studies import study
from tuning_playbook import study_presets

HERE = os.path.dirname(__file__)
REPO = os.path.dirname(os.path.abspath(HERE))


def _load_config_module(name):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(HERE, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _nuisance(**params):
  return ss.parse({"nuisance": params})


def _column(trials, key):
  return np.array([t[key] for t in trials])


def test_log_and_reverse_log_are_uniform_on_their_scale():
  space = _nuisance(lr={"scale": "log", "min": 1e-4, "max": 1.0},
                    beta={"scale": "reverse_log", "min": 0.9, "max": 0.9999})
  trials = space.sample(range(1024), seed=1)
  lr, beta = _column(trials, "lr"), _column(trials, "beta")
  assert lr.min() >= 1e-4 and lr.max() <= 1.0
  assert beta.min() >= 0.9 and beta.max() <= 0.9999
  # log10(lr) is uniform on [-4, 0]; log10(1 - beta) on [-4, -1].
  assert stats.kstest((np.log10(lr) + 4) / 4, "uniform").statistic < 0.01
  assert stats.kstest((np.log10(1 - beta) + 4) / 3,
                      "uniform").statistic < 0.01
  # Most of the mass of beta sits close to 1, unlike a linear scale.
  assert np.mean(beta > 0.99) == pytest.approx(2 / 3, abs=0.01)


def test_integer_scales_cover_every_integer_in_bounds():
  space = _nuisance(steps={"scale": "int_linear", "min": 0, "max": 9},
                    width={"scale": "int_log", "min": 1, "max": 7})
  trials = space.sample(range(1000), seed=2)
  steps = collections.Counter(t["steps"] for t in trials)
  assert sorted(steps) == list(range(10))
  assert max(abs(c - 100) for c in steps.values()) <= 2
  width = collections.Counter(t["width"] for t in trials)
  assert sorted(width) == list(range(1, 8))
  for k, count in width.items():  # P(k) = log((k + 1) / k) / log(8).
    assert count == pytest.approx(1000 * math.log((k + 1) / k) / math.log(8),
                                  abs=3)
  assert all(isinstance(t["steps"], int) for t in trials)


def test_extreme_units_stay_in_bounds():
  top = 1 - 2 ** -53
  for spec in ({"scale": "linear", "min": -1.0, "max": 2.0},
               {"scale": "log", "min": 1e-8, "max": 10.0},
               {"scale": "reverse_log", "min": 0.0, "max": 0.999},
               {"scale": "int_linear", "min": 3, "max": 5},
               {"scale": "int_log", "min": 16, "max": 512}):
    dim = _nuisance(x=spec).dimensions[0]
    assert dim.value(0.0) == pytest.approx(spec["min"])
    assert dim.value(top) == pytest.approx(spec["max"], rel=1e-9)
  dim = _nuisance(x={"values": ["a", "b", "c"]}).dimensions[0]
  assert [dim.value(u) for u in (0.0, 0.34, 0.67, top)] == ["a", "b", "c", "c"]


@pytest.mark.parametrize("n", [16, 30, 64, 100, 256])
def test_categorical_values_are_covered_evenly(n):
  space = _nuisance(a={"values": [0, 1]}, b={"values": ["x", "y", "z"]},
                    lr={"scale": "log", "min": 1e-3, "max": 1.0},
                    c={"values": list("pqrst")})
  for seed in range(5):
    trials = space.sample(range(n), seed)
    for key, k in (("a", 2), ("b", 3), ("c", 5)):
      counts = collections.Counter(t[key] for t in trials)
      assert len(counts) == k
      assert max(abs(c - n / k) for c in counts.values()) <= 3, (key, counts)
    # The first dimension (base 2) splits every even n exactly.
    assert collections.Counter(t["a"] for t in trials)[0] == n // 2


def _optimizer_spec(mode):
  spec = _load_config_module("optimizer_study").get_search_space()
  spec["scientific_mode"] = mode
  return spec


def test_conditional_parameters_are_distinct_dimensions():
  space = ss.parse(_optimizer_spec("joint"))
  names = [d.name for d in space.dimensions]
  assert "optimizer.learning_rate[optimizer.name=nesterov]" in names
  assert "optimizer.learning_rate[optimizer.name=adam]" in names
  trials = space.sample(range(64), seed=0)
  by_name = collections.defaultdict(list)
  for t in trials:
    by_name[t["optimizer.name"]].append(t)
  assert len(by_name["nesterov"]) == len(by_name["adam"]) == 32
  for t in by_name["nesterov"]:
    assert set(t) == {"optimizer.name", "optimizer.learning_rate",
                      "optimizer.momentum", "optimizer.weight_decay"}
    assert 1e-2 <= t["optimizer.learning_rate"] <= 1.0
  for t in by_name["adam"]:
    assert set(t) == {"optimizer.name", "optimizer.learning_rate",
                      "optimizer.beta1", "optimizer.weight_decay"}
    assert 1e-4 <= t["optimizer.learning_rate"] <= 1e-2
  # Each optimizer's learning rate spans its own range evenly.
  for name, (lo, hi) in (("nesterov", (1e-2, 1.0)), ("adam", (1e-4, 1e-2))):
    lr = np.log10([t["optimizer.learning_rate"] for t in by_name[name]])
    unit = (lr - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    assert stats.kstest(unit, "uniform").statistic < 0.12


def test_separate_mode_gives_one_study_per_scientific_value():
  studies = ss.split_scientific(ss.parse(_optimizer_spec("separate")))
  assert [slug for slug, _ in studies] == ["optimizer.name=nesterov",
                                           "optimizer.name=adam"]
  (_, nesterov), (_, adam) = studies
  assert nesterov.name == "optimizers/optimizer.name=nesterov"
  assert list(adam.to_json()) == ["optimizer.learning_rate", "optimizer.beta1",
                                  "optimizer.weight_decay"]
  a, n = adam.sample(range(8), 3), nesterov.sample(range(8), 3)
  assert all(t["optimizer.name"] == "adam" for t in a)
  assert all("optimizer.momentum" in t for t in n)
  # Same seed, same positions: trial i sits at the same relative place in
  # both learning-rate ranges, a paired comparison of the two optimizers.
  for ta, tn in zip(a, n):
    ua = (math.log10(ta["optimizer.learning_rate"]) + 4) / 2
    un = (math.log10(tn["optimizer.learning_rate"]) + 2) / 2
    assert ua == pytest.approx(un, abs=1e-9)


def test_nested_conditionals_and_exclusive_reuse():
  space = ss.parse({"nuisance": {"opt": {
      "values": ["sgd", "adam"],
      "conditional": {"adam": {"variant": {
          "values": ["plain", "decoupled"],
          "conditional": {"decoupled": {
              "wd": {"scale": "log", "min": 1e-5, "max": 1e-1}}}}}}}}})
  assert [d.name for d in space.dimensions] == [
      "opt", "variant[opt=adam]", "wd[opt=adam,variant=decoupled]"]
  for t in space.sample(range(40), 0):
    assert ("variant" in t) == (t["opt"] == "adam")
    assert ("wd" in t) == (t.get("variant") == "decoupled")


@pytest.mark.parametrize("spec,message", [
    ({"nuisance": {"lr": {"scale": "cubic", "min": 0, "max": 1}}}, "lr.scale"),
    ({"nuisance": {"lr": {"scale": "log", "min": 0.0, "max": 1}}}, "min > 0"),
    ({"nuisance": {"b": {"scale": "reverse_log", "min": 0.5, "max": 1.0}}},
     "max < 1"),
    ({"nuisance": {"n": {"scale": "int_linear", "min": 0.5, "max": 3}}},
     "integer bounds"),
    ({"nuisance": {"lr": {"scale": "log", "min": 1.0, "max": 0.1}}},
     "must be < max"),
    ({"nuisance": {"lr": {"scale": "log", "min": 1e-3, "max": 1, "mx": 2}}},
     "unknown field"),
    ({"nuisance": {"lr": 0.1}}, "nuisance.lr"),
    ({"nuisanse": {}}, "unknown search space key"),
    ({"nuisance": {"a": {"values": []}}}, "non-empty"),
    ({"nuisance": {"a": {"values": [1, 1]}}}, "repeated"),
    ({"nuisance": {"lr": {"scale": "log", "min": 1e-3, "max": 1}},
      "fixed": {"lr": 0.1}}, "both fixed and searched"),
    ({"nuisance": {"o": {"values": ["a", "b"], "conditional": {
        "a": {"lr": {"scale": "log", "min": 1e-3, "max": 1}}}},
        "lr": {"scale": "log", "min": 1e-3, "max": 1}}}, "searched twice"),
    ({"nuisance": {"o": {"values": ["a"], "conditional": {"z": {}}}}},
     "not one of"),
    ({"scientific": {"lr": {"scale": "log", "min": 1e-3, "max": 1}}},
     "scientific_mode='joint'"),
    ({"algorithm": "bayes"}, "algorithm"),
])
def test_invalid_spaces_name_the_problem(spec, message):
  with pytest.raises(ss.SearchSpaceError, match=message.replace("(", r"\(")):
    ss.parse(spec)


def test_config_dict_and_nested_sections_are_accepted():
  import ml_collections  # pylint: disable=g-import-not-at-top
  spec = ml_collections.ConfigDict({"nuisance": {"optimizer": {
      "learning_rate": {"scale": "log", "min": 1e-3, "max": 1.0}}}})
  space = ss.parse(spec)
  assert [d.name for d in space.dimensions] == ["optimizer.learning_rate"]


def test_grid_enumerates_the_product_in_order():
  space = ss.parse({"algorithm": "grid", "nuisance": {
      "a": {"values": ["x", "y"]},
      "lr": {"scale": "log", "min": 1e-3, "max": 1e-1, "grid_points": 3}}})
  assert space.grid_size() == 6
  trials = space.sample(range(6), seed=0)
  assert [t["a"] for t in trials] == ["x"] * 3 + ["y"] * 3
  np.testing.assert_allclose([t["lr"] for t in trials[:3]],
                             [1e-3, 1e-2, 1e-1], rtol=1e-12)
  assert space.sample(range(6), seed=5) == trials
  with pytest.raises(ss.SearchSpaceError, match="6 points"):
    space.sample([6], seed=0)
  with pytest.raises(ss.SearchSpaceError, match="1-2 dimensions"):
    ss.parse({"algorithm": "grid", "nuisance": {
        k: {"values": [1, 2]} for k in "abc"}})
  with pytest.raises(ss.SearchSpaceError, match="grid_points"):
    ss.parse({"algorithm": "grid", "nuisance": {
        "lr": {"scale": "log", "min": 1e-3, "max": 1}}})


def test_pseudo_random_trials_depend_only_on_seed_and_index():
  space = ss.parse({"algorithm": "pseudo_random", "nuisance": {
      "lr": {"scale": "log", "min": 1e-3, "max": 1.0}}})
  assert space.sample(range(3, 6), 4) == space.sample(range(6), 4)[3:]
  assert space.sample(range(6), 4) != space.sample(range(6), 5)


def test_joint_scientific_dimensions_come_first():
  spec = {"scientific_mode": "joint",
          "nuisance": {"lr": {"scale": "log", "min": 1e-3, "max": 1.0}},
          "scientific": {"depth": {"scale": "int_linear", "min": 2, "max": 5}}}
  (slug, space), = ss.split_scientific(ss.parse(spec))
  assert slug == "" and space.dimensions[0].name == "depth"
  counts = collections.Counter(t["depth"] for t in space.sample(range(64), 0))
  assert counts == {2: 16, 3: 16, 4: 16, 5: 16}


def test_adam_search_space_follows_trial_budget():
  keys = lambda n: list(study_presets.adam_nuisance(n))
  lr, b1, eps, b2 = ("optimizer.learning_rate", "optimizer.beta1",
                     "optimizer.epsilon", "optimizer.beta2")
  assert keys(9) == [lr]
  assert keys(10) == keys(24) == [lr, b1]
  assert keys(25) == keys(49) == [lr, b1, eps]
  assert keys(50) == [lr, b1, eps, b2]
  config = config_schema.base_config()
  config.optimizer.name = "adam"
  space = ss.parse(study_presets.default_search_space(config, num_trials=30))
  study.check_config_keys(space.config_keys(), config)
  assert [d.name for d in space.dimensions] == [
      lr, b1, eps, "optimizer.warmup_steps", "optimizer.weight_decay"]


def test_default_search_space_is_valid_for_the_base_config():
  config = config_schema.base_config()
  config.workload = "mnist1d_cnn"
  space = ss.parse(study_presets.default_search_space(config))
  study.check_config_keys(space.config_keys(), config)
  assert [d.name for d in space.dimensions] == [
      "optimizer.learning_rate", "optimizer.momentum",
      "optimizer.warmup_steps", "optimizer.weight_decay"]
  for params in space.sample(range(64), seed=0):
    study.resolve_trial_config(config, params)
  assert space.dimensions[2].max == config.max_train_steps // 10


def test_warmup_study_sweeps_orders_of_magnitude_at_ten_times_unstable():
  spec = study_presets.warmup_study(0.3, max_train_steps=100_000)
  space = ss.parse(spec)
  assert space.algorithm == "grid" and space.fixed == {
      "optimizer.schedule": "constant", "optimizer.warmup_mode": "prepended",
      "optimizer.learning_rate": 3.0}
  trials = space.sample(range(space.grid_size()), seed=0)
  assert [t["optimizer.warmup_steps"] for t in trials] == [10, 100, 1000,
                                                           10000]
  # Post-warmup = 2 x warmup; the warmup is prepended (3 x warmup in all).
  assert [t["max_train_steps"] for t in trials] == [20, 200, 2000, 20000]
  config = config_schema.base_config()
  config.workload = "mnist1d_cnn"
  study.check_config_keys(space.config_keys(), config)
  for params in trials:
    study.resolve_trial_config(config, {**space.fixed, **params})
  two_rates = ss.parse(study_presets.warmup_study(
      0.3, warmup_steps=[10, 100], learning_rate_factors=[10, 100]))
  rates = [t["optimizer.learning_rate"] for t in two_rates.sample(range(4), 0)]
  assert rates == pytest.approx([3.0, 30.0, 3.0, 30.0])


def test_golden_trials_of_tiny_study():
  with open(os.path.join(HERE, "golden", "tiny_study_trials.json")) as f:
    golden = json.load(f)
  space = ss.parse(_load_config_module("tiny_study").get_search_space())
  trials = space.sample(range(len(golden["trials"])), golden["seed"])
  for got, want in zip(trials, golden["trials"]):
    assert list(got) == list(want)
    for key, value in want.items():
      if isinstance(value, float):
        assert got[key] == pytest.approx(value, rel=1e-12, abs=0)
      else:
        assert got[key] == value


_LR, _B1, _EPS, _B2 = ("optimizer.learning_rate", "optimizer.beta1",
                       "optimizer.epsilon", "optimizer.beta2")


@pytest.mark.parametrize("num_trials,tuned", [
    (8, [_LR]),  # < 10 trials: only the learning rate.
    (16, [_LR, _B1]),  # 10-25: learning rate and beta1.
    (32, [_LR, _B1, _EPS]),  # 25+: and epsilon.
    (128, [_LR, _B1, _EPS, _B2]),  # Substantially more: and beta2.
])
def test_adam_config_tunes_the_playbook_set_for_its_budget(num_trials, tuned):
  path = os.path.join(REPO, "configs", "mnist1d_mlp.py")
  config = _load_config_module_at(path).get_config()
  assert config.optimizer.name == "adam"
  spec = search_space_file.load(path, config, num_trials)
  names = [d.name for d in ss.parse(spec).dimensions]
  assert names == tuned + ["optimizer.warmup_steps", "optimizer.weight_decay"]


def _load_config_module_at(path):
  spec = importlib.util.spec_from_file_location("_config_under_test", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_default_space_follows_the_resolved_config():
  path = os.path.join(REPO, "configs", "mnist1d_cnn.py")
  config = _load_config_module_at(path).get_config()
  config.max_train_steps = 300
  space = ss.parse(search_space_file.load(path, config, 8))
  warmup = {d.name: d for d in space.dimensions}["optimizer.warmup_steps"]
  assert (warmup.min, warmup.max) == (0, 30)
  assert config.max_train_steps == 300  # The search space got a copy.
  config.optimizer.name = "adam"
  names = [d.name for d in ss.parse(
      search_space_file.load(path, config, 16)).dimensions]
  assert names[:2] == [_LR, _B1] and _EPS not in names
  with pytest.raises(ValueError, match="num_trials"):
    search_space_file.load(path, config, None)  # Adam needs a budget.


@pytest.mark.parametrize("signature,received", [
    ("()", []),
    ("(config)", ["config 300"]),
    ("(num_trials)", [12]),
    ("(config, num_trials)", ["config 300", 12]),
    ("(config=None, num_trials=None)", ["config 300", 12]),
    ("(*args)", ["config 300", 12]),
])
def test_get_search_space_is_called_with_what_it_accepts(tmp_path, signature,
                                                         received):
  path = tmp_path / "space.py"
  path.write_text(f"""
def get_search_space{signature}:
  args = list(locals().get("args") or locals().values())
  for i, arg in enumerate(args):
    if hasattr(arg, "max_train_steps"):
      args[i] = f"config {{arg.max_train_steps}}"
      arg.max_train_steps = 1  # Must not reach the trials.
  lr = {{"scale": "log", "min": 1e-3, "max": 1.0}}
  return {{"description": repr(args),
          "nuisance": {{"optimizer.learning_rate": lr}}}}
""")
  config = config_schema.base_config()
  config.max_train_steps = 300
  spec = search_space_file.load(f"{path}:arg", config, 12)
  assert spec["description"] == repr(received)
  assert config.max_train_steps == 300


def test_zero_argument_config_files_still_define_their_study():
  for name in ("tiny_study", "optimizer_study"):
    path = os.path.join(HERE, "configs", f"{name}.py")
    config = _load_config_module(name).get_config()
    spec = search_space_file.load(path, config, 4)
    assert spec == _load_config_module(name).get_search_space()


@pytest.mark.parametrize("spec,where", [
    ({"nuisance": {"max_train_steps": {"scale": "int_log", "min": 100,
                                       "max": 1000}}},
     "nuisance.max_train_steps:"),
    ({"nuisance": {"length": {"values": [{"max_train_steps": 100},
                                         {"max_train_steps": 200}]}}},
     "nuisance.length (sets max_train_steps):"),
    ({"nuisance": {"o": {"values": ["a", "b"], "conditional": {"a": {
        "max_train_steps": {"values": [100, 200]}}}}}},
     "nuisance.max_train_steps[o=a] (sets max_train_steps):"),
    ({"scientific_mode": "joint", "scientific": {"max_train_steps": {
        "scale": "int_linear", "min": 100, "max": 200}}},
     "scientific.max_train_steps:"),
])
def test_searching_max_train_steps_is_refused_with_the_playbook_reason(
    spec, where):
  with pytest.raises(ss.SearchSpaceError) as error:
    ss.parse(spec)
  message = str(error.value)
  assert message.startswith(where), message
  assert ('The playbook ("Deciding how long to train when training is not '
          'compute-bound"): "Never tune the `max_train_steps` number in a '
          'study. Pick a value and use it for all trials."') in message


def test_scientific_training_lengths_are_compared_not_tuned():
  space = ss.parse({"scientific": {"max_train_steps": {"values": [100, 200]}},
                    "nuisance": {_LR: {"scale": "log", "min": 1e-3,
                                       "max": 1.0}}})
  studies = ss.split_scientific(space)
  assert [s.scientific for _, s in studies] == [{"max_train_steps": 100},
                                                {"max_train_steps": 200}]


def test_analysis_reads_the_dimensions_the_sampler_wrote(tmp_path):
  specs = {"a": {"scale": "linear", "min": -1.0, "max": 2.0},
           "b": {"scale": "log", "min": 1e-5, "max": 1e-1},
           "c": {"scale": "reverse_log", "min": 0.5, "max": 0.999},
           "d": {"scale": "int_linear", "min": 0, "max": 40},
           "e": {"scale": "int_log", "min": 16, "max": 512},
           "f": {"values": ["x", "y"]}}
  space = _nuisance(**specs)
  with open(tmp_path / "study.json", "w") as f:
    json.dump({"search_space": space.to_json(), "trials": []}, f)
  read = study_data.load_study(str(tmp_path)).dimensions
  assert study_data.Dimension is dimension.Dimension
  assert list(read.values()) == list(space.dimensions)
  for dim in space.dimensions[:5]:
    lo, hi = specs[dim.name]["min"], specs[dim.name]["max"]
    assert read[dim.name].position(lo) == 0 and read[dim.name].position(hi) == 1
    for u in (0.1, 0.5, 0.9):
      value = dim.value(u)
      assert read[dim.name].value_at(read[dim.name].position(value)) == (
          pytest.approx(value, rel=1e-12))
      if dim.scale not in dimension.INT_SCALES:  # Integers are rounded down.
        assert read[dim.name].position(value) == pytest.approx(u, abs=1e-12)
        assert read[dim.name].value_at(u) == value
  assert read["f"].position("x") is None
