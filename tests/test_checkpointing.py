"""Retention is best-N ∪ latest; NaN ranks worst; background errors surface."""

import math
import os

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.handlers import json_checkpoint_handler
import pytest

from tests import helpers
from tuning_playbook import checkpointing
from tuning_playbook import run

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
  config = helpers.load_config(**{"data.data_dir": str(tmp_path / "data"),
                                  "max_train_steps": 20})
  workdir = str(tmp_path / "run")
  with pytest.raises(Exception, match="disk full"):
    run.run_trial(config, workdir)
  summary = helpers.read_json(os.path.join(workdir, "summary.json"))
  assert summary["status"] == "failed"
  assert "disk full" in summary["reason"]
