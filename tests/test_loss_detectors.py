"""The loss-spike, divergence, stall and rising-loss detectors on synthetic
per-step losses with planted faults: each expected figure is worked out here
from the planted series (Thresholds() defaults: spike_window 10,
spike_factor 2, spike_jump 1, noise_multiple 3; loss_rise_windows 20,
loss_rise_skip 0.1, loss_rise_level 0.1, loss_rise_span 0.15)."""

import math

import numpy as np
import pytest

from tuning_playbook.analysis.findings import Thresholds
from tuning_playbook.analysis import loss_spikes
from tuning_playbook.analysis import loss_trend

THRESHOLDS = Thresholds()


def decay(s):
  """A smooth decaying loss: 2.5 at step 0, 0.5 in the limit."""
  return 0.5 + 2.0 * np.exp(-np.asarray(s, dtype=float) / 100.0)


def window_median_before(step):
  """Median of decay() over the 10 steps before `step` (1 step apart): a
  decreasing run, so the mean of its 5th and 6th values from the top."""
  return (decay(step - 5) + decay(step - 6)) / 2


def examine(losses, steps=None, **kwargs):
  losses = np.asarray(losses, dtype=float)
  if steps is None:
    steps = np.arange(1, len(losses) + 1)
  return loss_spikes.examine(np.asarray(steps), losses, THRESHOLDS, **kwargs)


def spike_tuples(result):
  return [(s.step, s.last_step, s.peak) for s in result.spikes]


# Spikes.


def test_one_spike_on_a_decaying_curve():
  steps = np.arange(1, 301)
  y = decay(steps)
  y[149] = 5.0  # Step 150.
  result = examine(y)
  (spike,) = result.spikes
  reference = window_median_before(150)  # 0.5 + 2 exp(-1.445) = 0.971...
  assert (spike.step, spike.last_step, spike.peak) == (150, 150, 5.0)
  assert spike.reference == pytest.approx(reference)
  assert spike.size == pytest.approx(5.0 / reference)
  assert result.first_nonfinite_step is None
  assert not result.stalled and result.rising is None
  assert result.unstable
  assert result.num_steps == 300
  assert result.first_loss == pytest.approx((decay(5) + decay(6)) / 2)
  assert result.final_loss == pytest.approx((decay(295) + decay(296)) / 2)


def test_the_smooth_curve_alone_has_nothing():
  result = examine(decay(np.arange(1, 301)))
  assert result.spikes == ()
  assert result.first_nonfinite_step is None
  assert not result.stalled and result.rising is None
  assert not result.unstable


def test_a_spike_is_reported_at_its_logged_step():
  steps = 100 * np.arange(1, 81)  # Logged every 100 steps.
  y = decay(np.arange(1, 81))
  y[50] = 4.0  # Index 50: step 5100.
  result = examine(y, steps)
  assert spike_tuples(result) == [(5100, 5100, 4.0)]
  assert result.spikes[0].reference == pytest.approx(window_median_before(51))


def test_several_spikes_one_of_them_three_steps_long():
  steps = np.arange(1, 401)
  y = decay(steps)
  planted = {100: 4.0, 200: 3.0, 201: 6.0, 202: 4.5, 300: 8.0}
  for step, value in planted.items():
    y[step - 1] = value
  result = examine(y)
  assert spike_tuples(result) == [(100, 100, 4.0), (200, 202, 6.0),
                                  (300, 300, 8.0)]
  for spike, first in zip(result.spikes, (100, 200, 300)):
    assert spike.reference == pytest.approx(window_median_before(first))
    assert spike.size == pytest.approx(spike.peak / spike.reference)


@pytest.mark.parametrize("gap,expected", [
    (3, [(100, 103, 6.0)]),
    (10, [(100, 110, 6.0)]),  # A window apart: still one spike.
    (11, [(100, 100, 4.0), (111, 111, 6.0)]),
])
def test_spike_steps_within_a_window_are_one_spike(gap, expected):
  y = decay(np.arange(1, 201))
  y[99] = 4.0
  y[99 + gap] = 6.0
  assert spike_tuples(examine(y)) == expected


@pytest.mark.parametrize("dip,spike", [(False, False), (True, True)])
def test_a_spike_must_exceed_spike_factor_x_the_lowest_median(dip, spike):
  # spike_factor 3: a jump to 2.5 from a flat 1.0 clears the jump rule
  # (2.5 - 1.0 > 1 x 1.0) but not 3 x the lowest 10-step median, 1.0;
  # after a stretch at 0.5 the lowest median is 0.5 and 2.5 > 3 x 0.5.
  thresholds = Thresholds(spike_factor=3.0)
  y = np.ones(80)
  y[10:30] = 0.5 if dip else 1.0
  y[60] = 2.5  # Step 61.
  result = loss_spikes.examine(np.arange(1, 81), y, thresholds)
  assert spike_tuples(result) == ([(61, 61, 2.5)] if spike else [])


@pytest.mark.parametrize("value,spike", [(2.0, False), (2.01, True)])
def test_on_a_flat_loss_a_spike_is_more_than_double(value, spike):
  y = np.ones(60)
  y[30] = value  # Step 31: reference 1, no noise: a spike above 2.
  result = examine(y)
  assert spike_tuples(result) == ([(31, 31, value)] if spike else [])
  assert result.stalled  # Flat: it ended where it started.


@pytest.mark.parametrize("value,spike", [(4.2, False), (4.25, True)])
def test_noise_in_the_window_raises_the_bar(value, spike):
  # Alternating 1.5, 0.5: any 10 steps have median 1.0 and median absolute
  # deviation 0.5, so a robust deviation of 1.4826 x 0.5 = 0.7413; a spike
  # must exceed 1.0 + 1 x 1.0 + 3 x 0.7413 = 4.2239.
  y = np.tile([1.5, 0.5], 30)
  y[40] = value  # Step 41.
  result = examine(y)
  assert spike_tuples(result) == ([(41, 41, value)] if spike else [])
  assert [s.reference for s in result.spikes] == ([1.0] if spike else [])


def test_noise_alone_has_no_spike():
  rng = np.random.default_rng(0)
  steps = np.arange(1, 2001)
  noisy = decay(steps / 4) * np.exp(0.15 * rng.normal(size=len(steps)))
  result = examine(noisy)
  assert result.spikes == ()
  assert not result.stalled and result.rising is None
  assert not result.unstable
  flat = 2.3 + 0.2 * rng.normal(size=1000)
  result = examine(flat)
  assert result.spikes == () and result.rising is None
  assert result.stalled


def test_a_spike_in_noise_is_found_at_its_step():
  rng = np.random.default_rng(1)
  steps = np.arange(1, 1001)
  y = decay(steps / 2) * np.exp(0.1 * rng.normal(size=len(steps)))
  y[699] = 3.0  # Step 700; the curve is ~0.53 there.
  result = examine(y)
  (spike,) = result.spikes
  assert (spike.step, spike.last_step, spike.peak) == (700, 700, 3.0)
  assert spike.reference == pytest.approx(np.median(y[689:699]))


def test_a_blow_up_in_the_first_window_is_a_spike():
  # Early instability: the loss at init, then a jump within the first
  # spike_window steps (no full window before it yet).
  y = np.concatenate([[2.26, 2.27, 1260.0, 95000.0, 11.4],
                      np.linspace(11.0, 2.4, 75)])
  result = examine(y)
  (spike,) = result.spikes
  # Step 3 is above 2 x every loss before it; step 4 too (and merges).
  assert (spike.step, spike.last_step, spike.peak) == (3, 4, 95000.0)
  assert spike.reference == pytest.approx((2.26 + 2.27) / 2)
  assert spike.size == pytest.approx(95000.0 / 2.265)
  assert result.unstable


def test_a_blow_up_at_the_second_step_is_a_spike():
  # Step 2 is above 2 x step 1; step 3 (407) is not above 2 x 245; step 4
  # is, two steps on: one spike, steps 2-4.
  result = examine([2.26, 245.0, 407.0, 7.8e7, math.nan])
  assert spike_tuples(result) == [(2, 4, 7.8e7)]
  assert result.spikes[0].reference == 2.26
  assert result.first_nonfinite_step == 5


def test_an_early_bump_within_the_noise_is_not_a_spike():
  # The early rule asks for more than 2 x every loss so far, which the
  # alternation 1.5, 0.5, 1.5, ... never reaches.
  y = np.tile([1.5, 0.5], 30)
  assert examine(y).spikes == ()
  y = np.concatenate([[2.26, 2.27, 4.51, 2.35, 2.45],
                      np.linspace(2.4, 1.5, 50)])
  assert examine(y).spikes == ()  # 4.51 < 2 x 2.27.


def test_a_spike_over_a_zero_loss_has_infinite_size():
  y = np.zeros(40)
  y[25] = 0.5
  (spike,) = examine(y).spikes
  assert (spike.step, spike.peak, spike.reference) == (26, 0.5, 0.0)
  assert spike.size == math.inf


# Divergence.


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_loss_is_divergence_at_its_step(bad):
  steps = np.arange(1, 201)
  y = decay(steps)
  y[119] = bad  # Step 120.
  y[149] = 10.0  # After the divergence: not examined.
  result = examine(y)
  assert result.first_nonfinite_step == 120
  assert result.spikes == ()
  assert not result.stalled  # Not judged once diverged.
  assert result.unstable
  assert result.num_steps == 200
  assert result.first_loss == pytest.approx((decay(5) + decay(6)) / 2)
  # The last window before the divergence: steps 110-119.
  assert result.final_loss == pytest.approx((decay(114) + decay(115)) / 2)


def test_a_spike_before_the_divergence_is_kept():
  y = decay(np.arange(1, 101))
  y[59] = 5.0  # Step 60.
  y[79:] = math.nan  # Step 80 on.
  result = examine(y)
  assert spike_tuples(result) == [(60, 60, 5.0)]
  assert result.first_nonfinite_step == 80


def test_non_finite_at_the_first_step():
  result = examine([math.nan, 1.0, 0.5])
  assert result.first_nonfinite_step == 1 and result.spikes == ()
  assert result.first_loss is None and result.final_loss is None
  assert not result.stalled and result.unstable


def test_a_diverged_run_with_finite_losses_diverged_at_its_final_step():
  y = decay(np.arange(1, 101))
  result = examine(y, diverged_step=100)
  assert result.first_nonfinite_step == 100 and result.unstable
  assert not result.stalled
  y[49] = math.nan
  assert examine(y, diverged_step=100).first_nonfinite_step == 50


# Stalls.


def test_a_flat_loss_stalled():
  result = examine(np.full(50, 2.3))
  assert result.stalled and result.unstable
  assert result.first_loss == result.final_loss == 2.3
  assert result.spikes == () and result.rising is None


@pytest.mark.parametrize("end,stalled", [(0.96, True), (0.94, False)])
def test_a_stall_is_ending_within_5_percent_of_the_start(end, stalled):
  # 20 steps at 1.0, then a flat stretch at `end` (the last 10 steps).
  y = np.concatenate([np.ones(20), np.full(30, end)])
  result = examine(y)
  assert (result.first_loss, result.final_loss) == (1.0, end)
  assert result.stalled == stalled
  assert result.unstable == stalled


def test_a_plateau_after_progress_is_not_a_stall():
  # Decay for 300 steps, then flat at the reached value for 700.
  y = decay(np.minimum(np.arange(1, 1001), 300))
  result = examine(y)
  assert not result.stalled and result.rising is None
  assert result.spikes == () and not result.unstable
  assert result.final_loss == pytest.approx(decay(300))


def test_a_plateau_before_progress_is_not_a_stall():
  # Flat at 2.5 for the first 300 steps, then a decay.
  y = decay(np.maximum(np.arange(1, 1001) - 300, 0))
  result = examine(y)
  assert result.first_loss == pytest.approx(2.5)
  assert not result.stalled and not result.unstable


def test_a_loss_back_where_it_started_stalled_and_rose():
  # Down from 2.0 to 1.0 by step 250, back up to 2.0 by step 500.
  steps = np.arange(1, 501)
  y = np.where(steps <= 250, 2.0 - (steps - 1) / 249,
               1.0 + (steps - 250) / 250)
  result = examine(y)
  # Medians of steps 1-10 and 491-500.
  assert result.first_loss == pytest.approx(2.0 - 4.5 / 249)
  assert result.final_loss == pytest.approx(1.0 + 245.5 / 250)
  assert result.stalled
  assert result.rising.end_step == 500
  assert result.spikes == ()


# Short and degenerate series.


@pytest.mark.parametrize("n", [0, 1, 2, 9])
def test_fewer_steps_than_a_window_judge_nothing(n):
  result = examine(np.linspace(2.0, 1.0, n))
  assert result.num_steps == n
  assert result.spikes == () and result.first_nonfinite_step is None
  assert result.first_loss is None and result.final_loss is None
  assert not result.stalled and result.rising is None
  assert not result.unstable


@pytest.mark.parametrize("n,first,final", [
    # Shorter than two windows: the first and last halves.
    (10, 1.8, 1.3),  # 2.0 - 0.1 i: medians of i = 0-4 and 5-9.
    (15, 1.955, 1.835),  # 2.0 - 0.015 i: medians of i = 0-6 and 8-14.
])
def test_a_short_falling_loss_is_not_a_stall(n, first, final):
  step = {10: 0.1, 15: 0.015}[n]
  result = examine(2.0 - step * np.arange(n))
  assert result.first_loss == pytest.approx(first)
  assert result.final_loss == pytest.approx(final)
  assert not result.stalled and not result.unstable


def test_a_short_flat_loss_stalled():
  result = examine(np.full(12, 2.3))
  assert result.stalled and result.first_loss == result.final_loss == 2.3


def test_the_record_is_plain_json():
  y = decay(np.arange(1, 301))
  y[149] = 5.0
  record = examine(y).to_json()
  assert record["unstable"] is True and record["stalled"] is False
  assert record["first_nonfinite_step"] is None and record["rising"] is None
  assert [(s["step"], s["last_step"], s["peak"]) for s in record["spikes"]] == [
      (150, 150, 5.0)]


# A sustained rise (loss_trend.rising_stretch).


def v_shape(rise_per_step, noise=0.0, seed=0):
  """Steps 1-1000: down 0.004 a step to 1.2 at step 550, then up."""
  steps = np.arange(1, 1001)
  y = np.where(steps <= 550, 3.0 - 0.004 * (steps - 100),
               1.2 + rise_per_step * (steps - 550))
  y = y + noise * np.random.default_rng(seed).normal(size=len(steps))
  return steps, y


def test_a_rise_from_a_known_step():
  # The first 10% (steps 1-100) are skipped; steps 101-1000 make 20 windows
  # of 45, the j-th ending at step 145 + 45 j with its median at the middle
  # step 123 + 45 j. The lowest window before the rise is j = 9 (506-550,
  # median at step 528: 1.288); the window medians climb from there.
  # A raised window is above 1.288 by more than 0.1 x 1.288 (the level term;
  # the improvement term is 0.05 x (2.908 - 1.288) = 0.081): j = 10 (1.292)
  # is not, j = 11 (1.472) to j = 19 (2.912) are: 9 windows >= 3 (15%).
  steps, y = v_shape(0.004)
  stretch = loss_trend.rising_stretch(steps, y, THRESHOLDS)
  assert (stretch.start_step, stretch.end_step) == (550, 1000)
  assert stretch.low == pytest.approx(1.288)
  assert stretch.peak == pytest.approx(2.912)
  assert stretch.rise == pytest.approx(2.912 - 1.288)
  assert stretch.threshold == pytest.approx(0.1288)
  assert stretch.noise == pytest.approx(0.0, abs=1e-9)
  # examine() reports the same stretch.
  assert examine(y, steps).rising == stretch


def test_a_rise_in_noise_from_a_known_step():
  steps, y = v_shape(0.01, noise=0.02)
  stretch = loss_trend.rising_stretch(steps, y, THRESHOLDS)
  assert (stretch.start_step, stretch.end_step) == (550, 1000)
  assert stretch.low == pytest.approx(1.288, abs=0.01)
  assert stretch.peak == pytest.approx(1.2 + 0.01 * 428, abs=0.01)
  assert stretch.noise == pytest.approx(0.02, rel=0.15)


def test_a_rise_ending_before_the_end():
  # Up 0.004 a step to 2.6 at step 400, then down 0.003 a step: window 0
  # (steps 101-145, median 1.492) is the lowest; a raised window is above it
  # by more than 0.1492: windows 1 (median at step 168: 1.672) to 13 (step
  # 708: 1.676) are, window 14 (step 753: 1.541) is not.
  steps = np.arange(1, 1001)
  y = np.where(steps <= 400, 1.0 + 0.004 * steps, 2.6 - 0.003 * (steps - 400))
  stretch = loss_trend.rising_stretch(steps, y, THRESHOLDS)
  assert (stretch.start_step, stretch.end_step) == (145, 730)
  assert stretch.low == pytest.approx(1.492)
  # The rise before step 400 is skipped as warmup: what is left only falls.
  assert loss_trend.rising_stretch(steps, y, THRESHOLDS, skip_steps=400) is None


def bump(windows):
  """Nearly flat, 1 - 1e-4 x step, but for a bump of 0.5 over `windows`
  whole windows from window 10 (steps 551 on)."""
  steps = np.arange(1, 1001)
  y = 1.0 - 1e-4 * steps
  y[(steps >= 551) & (steps < 551 + 45 * windows)] += 0.5
  return loss_trend.rising_stretch(steps, y, THRESHOLDS)


def test_a_rise_needs_15_percent_of_the_windows():
  # 15% of 20 windows is 3: a bump over 2 is too short, one over 4 is a
  # rise from window 9 (the lowest before it, median at step 528: 0.9472)
  # to window 13 (ending at step 730).
  assert bump(2) is None
  stretch = bump(4)
  assert (stretch.start_step, stretch.end_step) == (550, 730)
  assert stretch.low == pytest.approx(0.9472)
  assert stretch.peak == pytest.approx(1.5 - 0.0573)  # Window 10: step 573.


def test_falling_flat_and_noisy_losses_do_not_rise():
  steps = np.arange(1, 1001)
  assert loss_trend.rising_stretch(steps, decay(steps), THRESHOLDS) is None
  assert loss_trend.rising_stretch(steps, np.ones(1000), THRESHOLDS) is None
  rng = np.random.default_rng(2)
  noisy = decay(steps) * np.exp(0.2 * rng.normal(size=1000))
  assert loss_trend.rising_stretch(steps, noisy, THRESHOLDS) is None


def test_too_few_points_for_a_trend():
  # Rising steps 1-n: after the first 10% (up to step 1 + 0.1 (n - 1)),
  # 23 steps leave 20 points (MIN_POINTS), 22 leave 19.
  for n, found in ((23, True), (22, False)):
    steps = np.arange(1, n + 1)
    stretch = loss_trend.rising_stretch(steps, 1.0 + steps.astype(float),
                                        THRESHOLDS)
    assert (stretch is not None) == found, n


def test_non_finite_losses_are_left_out_of_the_trend():
  steps, y = v_shape(0.004)
  y[[600, 700, 800]] = math.nan
  stretch = loss_trend.rising_stretch(steps, y, THRESHOLDS)
  assert (stretch.start_step, stretch.end_step) == (550, 1000)
