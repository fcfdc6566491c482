"""The shipped configs on 1 device, 4 devices and 2 processes x 2 devices.

MNIST-1D trains on its data set, in one global order for any number of
processes. The other configs train tiny versions of their models on
synthetic batches, which each host draws for itself (the data depends on the
process count): their 2 x 2 job is compared with one process of 4 devices
fed the two hosts' batches. Same data and initialisation everywhere: only the
order of float reductions differs, so the logged metrics agree closely.

The one process of 4 devices is this one (tests/conftest.py: 4 simulated
devices, programs compiled as in the subprocesses, helpers.FAST_COMPILE),
which trains the very config the job's `tuning_playbook.main` recorded
(config.json, compared) and pays for no imports of its own. The 2 x 2 jobs
and the 1-device run are real processes.
"""

import os

import jax
import numpy as np
import pytest

from tests import helpers
from tuning_playbook.common import records
from tuning_playbook.training import synthetic_data
from tuning_playbook.training import train
from tuning_playbook.training import trial_setup

# 60 steps: 10 warmup steps prepended to 50.
SHORT_RUN = {"max_train_steps": 50, "eval_every_steps": 30, "log_every_steps": 10,
             "optimizer.warmup_steps": 10}
CONFIGS = ("mnist1d_cnn", "mnist1d_mlp")
COMPARED = ("train/loss", "train/grad_norm", "eval/validation/loss",
            "eval/validation/error_rate", "eval/test/loss", "eval/train/loss")


@pytest.fixture(scope="module")
def data_dir():
  """The session's TFDS directory (tests/conftest.py): MNIST-1D is prepared
  there once, under the product's lock, for every test that trains on it."""
  return os.environ["TFDS_DATA_DIR"]


def _config_path(name):
  return os.path.join(helpers.REPO, "configs", f"{name}.py")


def _flags(overrides):
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def _metrics(workdir):
  return helpers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def _train_here(config_path, overrides, workdir):
  """`config_path` with `overrides` trained in this process, on its 4 devices."""
  assert jax.device_count() == jax.local_device_count() == 4  # tests/conftest.py
  summary = train.train_and_evaluate(helpers.load_config(config_path, **overrides),
                                     workdir)
  assert summary["status"] == "completed", summary


def _assert_same_config(workdir, ref):
  """The job trained the config trained here (its flags, parsed by main)."""
  read = lambda d: helpers.read_json(os.path.join(d, records.CONFIG_FILE))
  assert read(workdir) == read(ref)


def _assert_close(rows, ref, rel, steps=(10, 20, 30, 40, 50, 60)):
  assert [r["step"] for r in rows] == [r["step"] for r in ref] == list(steps)
  for row, ref_row in zip(rows, ref):
    for key in COMPARED:
      if key in ref_row:
        assert row[key] == pytest.approx(ref_row[key], rel=rel, abs=1e-5), (
            row["step"], key)


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_on_four_devices_and_two_processes(name, tmp_path, data_dir):
  config = _config_path(name)
  overrides = {**SHORT_RUN, "data.data_dir": data_dir}
  runs = {label: str(tmp_path / label) for label in ("1x4", "2x2")}
  _train_here(config, overrides, runs["1x4"])  # Prepares the data set if needed.
  # One device against four: data parallelism, once (the models share it),
  # on the MLP. The CNN's learning rate sits at the edge of stability, which
  # amplifies any change in the order of float reductions: compiled fast, its
  # 4-device run drifts 1e-3 from 1 device's by step 20 (the MLP's, 1e-7).
  if name == "mnist1d_mlp":
    runs["1x1"] = str(tmp_path / "1x1")
    result = helpers.run_main(runs["1x1"], *_flags(overrides), config=config,
                              num_devices=1, fast_compile=True)
    assert result.returncode == 0, result.stderr[-4000:]
  command = helpers.main_command(runs["2x2"], *_flags(overrides), config=config)
  for rc, err in helpers.wait_all(helpers.start_processes(command, 2, 2), timeout=400):
    assert rc == 0, err[-4000:]
  four, two_by_two = _metrics(runs["1x4"]), _metrics(runs["2x2"])
  if "1x1" in runs:
    _assert_same_config(runs["1x1"], runs["1x4"])
    _assert_close(four, _metrics(runs["1x1"]), rel=2e-3)
  _assert_same_config(runs["2x2"], runs["1x4"])
  _assert_close(two_by_two, four, rel=1e-4)
  for label, workdir in runs.items():
    summary = helpers.read_json(os.path.join(workdir, "summary.json"))
    assert summary["status"] == "completed", (label, summary)
  # Learning, not just agreeing: well below chance (0.9 error) after 60 steps.
  assert four[-1]["eval/validation/error_rate"] < 0.8


# 4 steps (no warmup), a log row at each, an eval at the last.
SYNTHETIC_RUN = {"data.synthetic": True, "batch_size": 8, "eval_batch_size": 8,
                 "max_train_steps": 4, "eval_every_steps": 4,
                 "log_every_steps": 1, "optimizer.warmup_steps": 0}
# Tiny models: fields of the shipped file are set by flags; fields it leaves
# to the workload's defaults (no flag can add a key) by a config file over it.
TINY_MODELS = {  # name: (flags' overrides, model fields the file lacks)
    "cifar10_wrn": ({"model.depth": 10, "model.width": 1}, {}),
    "imagenet_resnet50": ({"model.depth": 18, "model.width_multiplier": 0.0625},
                          {"image_size": 32, "num_classes": 10}),
    "imagenet_vit": ({"model.variant": "Ti/16"},
                     {"depth": 1, "hidden_size": 32, "num_heads": 2, "mlp_dim": 64,
                      "image_size": 32, "num_classes": 10}),
    "lm_transformer": ({"model.num_layers": 1, "model.emb_dim": 16,
                        "model.num_heads": 2, "model.mlp_dim": 32,
                        "model.max_len": 16, "data.max_length": 16}, {}),
}
NUM_PROCESSES = 2


class HostsTrainStream:
  """The synthetic streams of `NUM_PROCESSES` hosts in one process: each
  batch is the hosts' local batches in process order (the global batch of
  the multi-process job)."""

  def __init__(self, config, workload, builder=None):
    del builder  # Synthetic: no data set.
    spec = synthetic_data.workload_spec(config, workload)
    self._hosts = [synthetic_data.SyntheticTrainStream(
        spec, seed=config.seed, local_batch_size=config.batch_size // NUM_PROCESSES,
        process_index=p, process_count=NUM_PROCESSES) for p in range(NUM_PROCESSES)]
    self.layout = self._hosts[0].layout  # What the job's checkpoints record.

  def element_spec(self):
    return self._hosts[0].element_spec()

  def position(self, step):
    return self._hosts[0].position(step)

  def iterate(self, start_step):
    for batches in zip(*(h.iterate(start_step) for h in self._hosts)):
      yield {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def hosts_eval_splits(config, workload, builder=None):
  """The multi-process job's synthetic eval splits, whole, in one process."""
  del builder  # Synthetic: no data set.
  spec = synthetic_data.workload_spec(config, workload)
  hosts = [synthetic_data.make_eval_splits(
      spec, local_batch_size=config.eval_batch_size // NUM_PROCESSES,
      process_index=p, process_count=NUM_PROCESSES) for p in range(NUM_PROCESSES)]
  return [synthetic_data.SyntheticEvalSplit(
      name=parts[0].name,
      batch={k: np.concatenate([s.batch[k] for s in parts]) for k in parts[0].batch},
      local_batch_size=config.eval_batch_size, total_examples=config.eval_batch_size)
          for parts in zip(*hosts)]


def _config_file(name, fields, directory):
  """The shipped config, or a config file that adds `fields` to its model."""
  if not fields:
    return _config_path(name)
  path = os.path.join(directory, f"{name}_tiny.py")
  model = {f"model.{k}": v for k, v in fields.items()}
  with open(path, "w") as f:
    f.write("from tests import helpers\n\n\ndef get_config():\n"
            f"  return helpers.load_config({_config_path(name)!r}, **{model!r})\n")
  return path


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_synthetic_config_on_two_processes_matches_one_process(
    name, tmp_path, monkeypatch):
  # Tiny models on synthetic data, compiled fast (helpers.FAST_COMPILE) here
  # and in the job's processes (helpers.subprocess_env).
  model, fields = TINY_MODELS[name]
  data_dir = str(tmp_path / "data")
  overrides = {**SYNTHETIC_RUN, **model, "data.data_dir": data_dir}
  config = _config_file(name, fields, str(tmp_path))
  job, one = str(tmp_path / "2x2"), str(tmp_path / "1x4")
  command = helpers.main_command(job, *_flags(overrides), config=config)
  for rc, err in helpers.wait_all(
      helpers.start_processes(command, NUM_PROCESSES, 2), timeout=400):
    assert rc == 0, err[-4000:]
  # One process of 4 devices (this one) fed the two hosts' batches.
  monkeypatch.setattr(trial_setup, "make_train_stream", HostsTrainStream)
  monkeypatch.setattr(trial_setup, "make_eval_splits", hosts_eval_splits)
  _train_here(config, overrides, one)
  _assert_same_config(job, one)
  rows, ref = _metrics(job), _metrics(one)
  _assert_close(rows, ref, rel=1e-4, steps=range(1, 5))
  assert "eval/validation/loss" in rows[-1]
  for workdir in (job, one):
    summary = helpers.read_json(os.path.join(workdir, "summary.json"))
    assert summary["status"] == "completed" and summary["final_step"] == 4
  assert not os.path.exists(data_dir)  # No data set read or prepared.
