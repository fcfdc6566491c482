"""Retention is best-N ∪ latest; NaN ranks worst; background errors surface."""

import math
import os

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.handlers import json_checkpoint_handler
import pytest

from tests import helpers
from tuning_playbook.training import checkpointing
from tuning_playbook.training import run
from tuning_playbook.training import trial_records

METRIC = "eval/validation/error_rate"


def _save_sequence(directory, values, num_best=2, mode="min"):
  ckpt = checkpointing.Checkpointer(directory, num_best=num_best, best_metric=METRIC,
                                    best_mode=mode)
  for step, value in enumerate(values, start=1):
    state = {"w": jnp.full((3,), float(step))}
    ckpt.save(step, state, {"step": step}, {METRIC: value})
    ckpt.wait()
  kept = ckpt.all_steps()
  ckpt.close()
  return kept


def test_a_worsening_metric_keeps_the_latest_for_resumption(tmp_path):
  # With best_fn + max_to_keep alone, steps 3..5 would evict the newest.
  assert _save_sequence(str(tmp_path), [0.5, 0.3, 0.6, 0.7, 0.8]) == [1, 2, 5]


def test_nan_and_inf_rank_worst_and_stay_unconverted(tmp_path):
  kept = _save_sequence(str(tmp_path), [0.5, float("nan"), 0.4, float("inf"), 0.9, 0.45])
  assert kept == [3, 6]
  kept = _save_sequence(str(tmp_path / "max"), [0.5, float("nan"), 0.4, 0.6],
                        mode="max")
  assert kept == [1, 4]
  assert checkpointing.rank_key(float("nan"), "min") == -math.inf
  assert checkpointing.rank_key(float("-inf"), "max") == -math.inf
  assert checkpointing.rank_key(None, "max") == -math.inf


def test_latest_nan_checkpoint_is_still_kept(tmp_path):
  assert _save_sequence(str(tmp_path), [0.5, 0.3, float("nan")]) == [1, 2, 3]


def test_restores_exact_values_and_metadata(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), num_best=1, best_metric=METRIC,
                                    best_mode="min")
  state = {"w": jnp.arange(4.0), "k": jnp.array([7, 9], jnp.uint32)}
  ckpt.save(3, state, {"step": 3, "best_value": None}, {METRIC: 0.1})
  ckpt.wait()
  restored, meta = ckpt.restore(3, {"w": ocp.utils.to_shape_dtype_struct(state["w"]),
                                    "k": ocp.utils.to_shape_dtype_struct(state["k"])})
  ckpt.close()
  np.testing.assert_array_equal(restored["w"], np.arange(4.0))
  np.testing.assert_array_equal(restored["k"], [7, 9])
  assert meta == {"step": 3, "best_value": None}
  # Nothing in a checkpoint is a pickle.
  for dirpath, _, filenames in os.walk(tmp_path):
    for name in filenames:
      with open(os.path.join(dirpath, name), "rb") as f:
        assert not f.read(2).startswith(b"\x80"), name


def test_background_save_error_fails_the_run(monkeypatch, tmp_path):
  async def broken_write(self, x, directory):
    raise OSError("disk full (simulated)")
  monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn",
                      broken_write)
  config = helpers.load_config(max_train_steps=20)
  workdir = str(tmp_path / "run")
  with pytest.raises(Exception, match="disk full"):
    run.run_trial(config, workdir)
  summary = helpers.read_json(os.path.join(workdir, "summary.json"))
  assert summary["status"] == "failed"
  assert "disk full" in summary["reason"]


def test_ties_keep_the_earliest_best_which_the_summary_names(tmp_path):
  # Step 1 and 2 tie at the best value; the earliest is the best and is kept.
  assert _save_sequence(str(tmp_path), [0.1, 0.1, 0.2], num_best=1) == [1, 3]
  best = trial_records.BestCheckpoint(METRIC, "min")
  for step, value in enumerate([0.1, 0.1, 0.2], start=1):
    best.update(step, value)
  assert best.step == 1


def test_set_aside_checkpoints_are_removed_while_training(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path), num_best=1, best_metric=METRIC,
                                    best_mode="min")
  for step in range(1, 6):
    ckpt.save(step, {"w": jnp.full((1000,), float(step))}, {"step": step},
              {METRIC: 1.0 / step})
    ckpt._manager.wait_until_finished()  # pylint: disable=protected-access
    todelete = tmp_path / "todelete"
    # Each save makes the step before it obsolete: set aside, and only it
    # waits there until the next save.
    if step == 1:
      assert not todelete.exists()
    else:
      assert os.listdir(todelete) == [str(step - 1)]
    assert sorted(n for n in os.listdir(tmp_path) if n.isdigit()) == [str(step)]
  ckpt.wait()
  assert not (tmp_path / "todelete").exists()
  ckpt.close()


def test_retention_after_a_restart_equals_retention_without_one(tmp_path):
  values = [0.5, 0.2, 0.3, 0.6, 0.25, 0.7]
  uninterrupted = _save_sequence(str(tmp_path / "a"), values, num_best=2)
  directory = str(tmp_path / "b")
  for lo, hi in ((0, 3), (3, 6)):  # A new manager, as after a kill, at step 4.
    ckpt = checkpointing.Checkpointer(directory, num_best=2, best_metric=METRIC,
                                      best_mode="min")
    for step in range(lo + 1, hi + 1):
      ckpt.save(step, {"w": jnp.full((3,), float(step))}, {"step": step},
                {METRIC: values[step - 1]})
      ckpt.wait()
    kept = ckpt.all_steps()
    ckpt.close()
  assert kept == uninterrupted == [2, 5, 6]


def test_rapid_async_saves_never_race_the_deleter(tmp_path):
  # Under a worsening metric every save sets an older step aside in todelete/
  # while the next save may already be starting.
  num_saves = 30
  ckpt = checkpointing.Checkpointer(str(tmp_path), num_best=2, best_metric=METRIC,
                                    best_mode="min")
  for step in range(1, num_saves + 1):
    ckpt.save(step, {"w": jnp.full((16,), float(step))}, {"step": step},
              {METRIC: float(step)})
  kept = ckpt.all_steps()
  ckpt.close()
  expected = [1, 2, num_saves]  # Best-2 ∪ latest.
  assert kept == expected
  assert sorted(int(n) for n in os.listdir(tmp_path) if n.isdigit()) == expected
  assert not (tmp_path / "todelete").exists()
