"""The shipped MNIST-1D configs on 1 device, 4 devices and 2 processes x 2 devices.

Same data order and initialisation everywhere: only the order of float
reductions differs, so the logged metrics agree closely.
"""

import os

import pytest

from tests import helpers

# 60 steps: 10 warmup steps prepended to 50.
SHORT_RUN = ("--config.max_train_steps=50", "--config.eval_every_steps=30",
             "--config.log_every_steps=10", "--config.optimizer.warmup_steps=10")
CONFIGS = ("mnist1d_cnn", "mnist1d_mlp")
COMPARED = ("train/loss", "train/grad_norm", "eval/validation/loss",
            "eval/validation/error_rate", "eval/test/loss", "eval/train/loss")


@pytest.fixture(scope="module")
def data_flag(tmp_path_factory):
  return f"--config.data.data_dir={tmp_path_factory.mktemp('data')}"


def _config_path(name):
  return os.path.join(helpers.REPO, "configs", f"{name}.py")


def _metrics(workdir):
  return helpers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def _assert_close(rows, ref, rel):
  assert [r["step"] for r in rows] == [r["step"] for r in ref] == [10, 20, 30, 40, 50, 60]
  for row, ref_row in zip(rows, ref):
    for key in COMPARED:
      if key in ref_row:
        assert row[key] == pytest.approx(ref_row[key], rel=rel, abs=1e-5), (
            row["step"], key)


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_on_four_devices_and_two_processes(name, tmp_path, data_flag):
  config = _config_path(name)
  runs = {}
  for label, devices in (("1x1", 1), ("1x4", 4)):
    runs[label] = str(tmp_path / label)
    result = helpers.run_main(runs[label], data_flag, *SHORT_RUN, config=config,
                              num_devices=devices)
    assert result.returncode == 0, result.stderr[-4000:]
  runs["2x2"] = str(tmp_path / "2x2")
  command = helpers.main_command(runs["2x2"], data_flag, *SHORT_RUN, config=config)
  for rc, err in helpers.wait_all(helpers.start_processes(command, 2, 2), timeout=400):
    assert rc == 0, err[-4000:]
  one, four, two_by_two = (_metrics(runs[k]) for k in ("1x1", "1x4", "2x2"))
  _assert_close(four, one, rel=2e-3)
  _assert_close(two_by_two, four, rel=1e-4)
  for label, workdir in runs.items():
    summary = helpers.read_json(os.path.join(workdir, "summary.json"))
    assert summary["status"] == "completed", (label, summary)
  # Learning, not just agreeing: well below chance (0.9 error) after 60 steps.
  assert one[-1]["eval/validation/error_rate"] < 0.8
