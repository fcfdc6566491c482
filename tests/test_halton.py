"""Tests of the scrambled Halton sequence: uniformity, determinism, golden."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats
from scipy.stats import qmc

from tuning_playbook.studies import halton

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "halton_points.json")
# Dimension of the default search space (learning rate, momentum, warmup,
# weight decay; see tuning_playbook/study_presets.default_search_space).
DEFAULT_DIMS = 4


def test_unscrambled_radical_inverse_is_van_der_corput():
  np.testing.assert_array_equal(
      halton.radical_inverse(range(8), 2),
      [0, 1 / 2, 1 / 4, 3 / 4, 1 / 8, 5 / 8, 3 / 8, 7 / 8])
  np.testing.assert_allclose(
      halton.radical_inverse(range(6), 3),
      [0, 1 / 3, 2 / 3, 1 / 9, 4 / 9, 7 / 9], rtol=0, atol=1e-15)
  points = halton.scrambled_halton(range(5), 3, seed=0, scramble=False)
  np.testing.assert_allclose(points[3], [3 / 4, 1 / 9, 3 / 5], atol=1e-15)


def test_primes():
  assert halton.primes(10) == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]


@pytest.mark.parametrize("base", [2, 3, 7, 29])
def test_digit_permutations_are_seeded_permutations(base):
  perms = halton.digit_permutations(base, dim=1, seed=0)
  assert perms.shape == (halton.digit_count(base), base)
  for row in perms:
    assert sorted(row) == list(range(base))
  identity = np.tile(np.arange(base), (len(perms), 1))
  assert not np.array_equal(perms, identity)  # Seed 0 scrambles too.
  np.testing.assert_array_equal(perms, halton.digit_permutations(base, 1, 0))
  assert not np.array_equal(perms, halton.digit_permutations(base, 1, 1))
  assert not np.array_equal(perms, halton.digit_permutations(base, 2, 0))


def test_points_lie_in_unit_cube_even_for_large_indices():
  points = halton.scrambled_halton(
      [0, 1, 2 ** 40, 2 ** 52 - 1, 10 ** 15], 12, seed=5)
  assert points.min() >= 0 and points.max() < 1


@pytest.mark.parametrize("base_dim,n", [(0, 64), (1, 81), (2, 125)])
def test_first_base_power_points_are_stratified(base_dim, n):
  # The first b**k points put exactly one point in each interval of width
  # 1/b**k of the coordinate of base b.
  points = halton.scrambled_halton(range(n), 3, seed=11)
  cells = np.floor(points[:, base_dim] * n).astype(int)
  assert sorted(cells) == list(range(n))


def _mean_cd(sampler, n, dims, seeds=range(10)):
  """Mean over seeds of SciPy's centered discrepancy (the squared CD)."""
  return float(np.mean([qmc.discrepancy(sampler(n, dims, s)) for s in seeds]))


def _ours(n, dims, seed):
  return halton.scrambled_halton(range(n), dims, seed)


def _iid(n, dims, seed):
  return np.random.default_rng(1000 + seed).random((n, dims))


def _scipy(n, dims, seed):
  return qmc.Halton(dims, scramble=True, seed=seed).random(n)


@pytest.mark.parametrize("n,min_ratio", [(16, 3), (32, 4), (64, 6),
                                         (128, 8), (256, 12)])
def test_centered_discrepancy_far_below_iid_and_on_par_with_scipy(n, min_ratio):
  ours = _mean_cd(_ours, n, DEFAULT_DIMS)
  iid = _mean_cd(_iid, n, DEFAULT_DIMS)
  scipy_halton = _mean_cd(_scipy, n, DEFAULT_DIMS)
  assert iid / ours > min_ratio, (ours, iid)
  assert ours < 1.25 * scipy_halton, (ours, scipy_halton)


def test_discrepancy_low_in_more_dimensions():
  # Bases up to 19: the digit scramble keeps the sequence well below iid and
  # level with SciPy's scrambled Halton at 64 trials.
  ours = _mean_cd(_ours, 64, 8)
  assert _mean_cd(_iid, 64, 8) / ours > 2.5
  assert ours < 1.15 * _mean_cd(_scipy, 64, 8)


def test_each_dimension_passes_ks_far_better_than_iid():
  n = 4096
  points = halton.scrambled_halton(range(n), 8, seed=3)
  iid_critical = 1.36 / np.sqrt(n)  # 5% KS critical value for iid samples.
  for dim in range(8):
    result = stats.kstest(points[:, dim], "uniform")
    assert result.statistic < iid_critical / 5, (dim, result.statistic)


def test_point_depends_only_on_seed_and_index():
  many = halton.scrambled_halton(range(200), 6, seed=9)
  np.testing.assert_array_equal(halton.scrambled_halton(range(10), 6, 9),
                                many[:10])
  np.testing.assert_array_equal(halton.scrambled_halton(range(150, 200), 6, 9),
                                many[150:])
  # Adding dimensions leaves the existing coordinates unchanged.
  np.testing.assert_array_equal(halton.scrambled_halton(range(200), 3, 9),
                                many[:, :3])


def test_identical_in_another_process():
  code = ("import json; from tuning_playbook.studies import halton; "
          "print(json.dumps(halton.scrambled_halton(range(40), 5, 123)"
          ".tolist() + halton.pseudo_random(range(40), 5, 123).tolist()))")
  env = dict(os.environ, PYTHONHASHSEED="4321")
  out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                       capture_output=True, text=True).stdout
  here = (halton.scrambled_halton(range(40), 5, 123).tolist()
          + halton.pseudo_random(range(40), 5, 123).tolist())
  assert json.loads(out) == here


def test_seed_zero_is_an_ordinary_seed():
  zero = halton.scrambled_halton(range(64), DEFAULT_DIMS, 0)
  assert not np.array_equal(zero, halton.scrambled_halton(range(64), 4, 1))
  unscrambled = halton.scrambled_halton(range(64), 4, 0, scramble=False)
  assert np.abs(zero - unscrambled).max() > 0.1
  assert qmc.discrepancy(zero) < 2 * _mean_cd(_ours, 64, DEFAULT_DIMS)


def test_pseudo_random_is_uniform_and_prefix_stable():
  points = halton.pseudo_random(range(2000), 3, seed=0)
  assert points.min() >= 0 and points.max() < 1
  for dim in range(3):
    assert stats.kstest(points[:, dim], "uniform").pvalue > 0.01
  np.testing.assert_array_equal(halton.pseudo_random(range(7), 3, 0),
                                points[:7])
  ratio = _mean_cd(lambda n, d, s: halton.pseudo_random(range(n), d, s),
                   64, DEFAULT_DIMS) / _mean_cd(_iid, 64, DEFAULT_DIMS)
  assert 0.6 < ratio < 1.6


def test_rejects_bad_seeds_and_indices():
  for seed in (-1, 2 ** 64, 1.5, True):
    with pytest.raises(ValueError, match="seed"):
      halton.scrambled_halton(range(3), 2, seed)
  with pytest.raises(ValueError, match="indices"):
    halton.scrambled_halton([-1], 2, 0)


def test_golden_points():
  with open(GOLDEN) as f:
    golden = json.load(f)
  for case in golden["cases"]:
    points = halton.scrambled_halton(range(case["num_points"]),
                                     case["num_dims"], case["seed"])
    # Exact: each coordinate is an integer over a power of its base.
    assert points.tolist() == case["points"], case["seed"]
