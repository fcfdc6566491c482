"""Fully sharded data parallelism (config.sharding.mesh.fsdp) on 4 simulated
devices and on 2 processes x 2 devices, against plain data parallelism.

Sharding changes where arrays live and which collectives run, not the
arithmetic of a step, except for the order of float reductions: runs agree
to float tolerance (measured here: relative differences below 1e-6 over 50
steps of the MLP; the tests allow 1e-5, and 1e-4 across processes).
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests import helpers
from tuning_playbook.common import config_validation
from tuning_playbook.common import records
from tuning_playbook import config_schema
from tuning_playbook.training import sharding, train

MLP_CONFIG = os.path.join(helpers.REPO, "configs", "mnist1d_mlp.py")
# 50 steps, an eval (and a checkpoint, all kept) every 10, a log row every 5.
RUN = {"max_train_steps": 50, "eval_every_steps": 10, "log_every_steps": 5,
       "optimizer.warmup_steps": 0, "num_best_checkpoints": 5,
       "sharding.fsdp_min_size": 0}
COMPARED = ("train/loss", "train/grad_norm", "eval/validation/loss",
            "eval/validation/error_rate", "eval/train/loss")


def _mlp_config(fsdp, **overrides):
  return helpers.load_config(MLP_CONFIG, **{**RUN, "sharding.mesh.fsdp": fsdp,
                                            **overrides})


def _rows(workdir):
  return helpers.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def _assert_close(rows, ref, rel, first_step=1):
  ref = [r for r in ref if r["step"] >= first_step]
  rows = [r for r in rows if r["step"] >= first_step]
  assert [r["step"] for r in rows] == [r["step"] for r in ref]
  compared = 0
  for row, ref_row in zip(rows, ref):
    for key in COMPARED:
      if key in ref_row:
        assert row[key] == pytest.approx(ref_row[key], rel=rel), (row["step"], key)
        compared += 1
  assert compared >= len(ref)


def _train(config, workdir):
  """Trains `config` in this process; returns its trainer's sharded state
  shapes (one device's) before it finishes."""
  workload = train.validate_before_compiling(config)
  trainer = train.Trainer([config], [workdir], [workload])
  trainer.run()
  return trainer


def _device0_bytes(tree, fields=("params", "opt_state")):
  """Bytes of `fields` of a stacked state held on the first device."""
  total = 0
  for field in fields:
    for leaf in jax.tree.leaves(getattr(tree, field)):
      shard = next(s for s in leaf.addressable_shards if s.device == jax.devices()[0])
      total += shard.data.nbytes
  return total


def test_fsdp_spec_splits_the_largest_divisible_dimension():
  assert sharding.fsdp_spec((40, 100), 4, 0) == P(None, "fsdp")
  assert sharding.fsdp_spec((100, 10), 4, 0) == P("fsdp", None)
  assert sharding.fsdp_spec((64, 64), 4, 0) == P(None, "fsdp")  # Ties: the last.
  assert sharding.fsdp_spec((3, 8, 6), 2, 0) == P(None, "fsdp", None)
  assert sharding.fsdp_spec((3, 10, 6), 4, 0) == P()  # Nothing divisible.
  assert sharding.fsdp_spec((256, 256), 4, 65537) == P()  # Below the minimum.
  assert sharding.fsdp_spec((256, 256), 1, 0) == P()  # No fsdp axis.
  assert sharding.fsdp_spec((), 4, 0) == P()


def _abstract_state():
  return {"params": {"Dense_0": {"kernel": jax.ShapeDtypeStruct((8, 12), np.float32),
                                 "bias": jax.ShapeDtypeStruct((12,), np.float32)},
                     "Embed_0": {"embedding": jax.ShapeDtypeStruct((10, 8), np.float32)}},
          "batch_stats": {"mean": jax.ShapeDtypeStruct((12,), np.float32)}}


def test_workload_rules_come_before_the_default_and_bad_rules_name_themselves():
  mesh = jax.make_mesh((1, 4), ("data", "fsdp"))
  specs = jax.tree.map(lambda s: s.spec, sharding.state_shardings(
      _abstract_state(), mesh, min_size=0,
      rules=[(r"Dense_0/kernel$", ("fsdp", None))]))
  assert specs["params"]["Dense_0"]["kernel"] == P("fsdp", None)  # The rule.
  assert specs["params"]["Dense_0"]["bias"] == P("fsdp")  # The default.
  assert specs["batch_stats"]["mean"] == P()  # Always replicated.
  for rule, message in (((r"kernel", ("model", None)), "names mesh axis 'model'"),
                        ((r"kernel", ("fsdp",)), "one axis name or None per dimension"),
                        ((r"bias", (("data", "fsdp"),)), None)):
    if message is None:  # 12 splits over 1 x 4 devices.
      sharding.state_shardings(_abstract_state(), mesh, min_size=0, rules=[rule])
      continue
    with pytest.raises(sharding.ShardingError, match=message) as error:
      sharding.state_shardings(_abstract_state(), mesh, min_size=0, rules=[rule])
    assert repr(rule[0]) in str(error.value)
  assert specs["params"]["Embed_0"]["embedding"] == P(None, "fsdp")
  with pytest.raises(sharding.ShardingError, match="dimension 0 of params/Embed_0/"
                     r"embedding \(shape \(10, 8\)\) over 4 devices, which do not divide"):
    sharding.state_shardings(_abstract_state(), mesh, min_size=0,
                             rules=[("embedding", ("fsdp", None))])
  with pytest.raises(sharding.ShardingError, match="'kernel' for params/Dense_0/kernel"):
    sharding.state_shardings(_abstract_state(), mesh, min_size=0,
                             rules=[("kernel", ("fsdp", "fsdp"))])


@pytest.mark.parametrize("mesh, message", [
    ({"data": 2, "fsdp": 4}, "config.sharding.mesh='data=2, fsdp=4' is invalid: the "
     "axes' sizes must multiply to the 4 devices"),
    ({"data": -1, "fsdp": 3}, "config.sharding.mesh.data=-1 is invalid: the other "
     "axes (data=-1, fsdp=3) must divide the 4 devices"),
    ({"data": -1, "fsdp": -1}, "only one axis may be -1"),
    ({"data": 0, "fsdp": 4}, "config.sharding.mesh.data=0 is invalid: must be a "
     "positive integer, or -1"),
    ({"data": 1, "fsdp": 4, "model": 1}, "config.sharding.mesh.model=1 is invalid: "
     "unknown key; allowed keys here: sharding.mesh.data, sharding.mesh.fsdp"),
])
def test_bad_meshes_name_the_key_before_compiling(mesh, message):
  config = _mlp_config(1)
  config.sharding.mesh = mesh
  with pytest.raises(config_schema.ConfigError) as error:
    config_validation.validate(config, num_devices=4)
  assert message in str(error.value)


def test_mesh_axis_sizes_resolve_minus_one():
  config = _mlp_config(2)
  assert config_schema.mesh_axis_sizes(config, 8) == {"data": 4, "fsdp": 2}
  config.sharding.mesh = {"data": 2, "fsdp": -1}
  assert config_schema.mesh_axis_sizes(config, 8) == {"data": 2, "fsdp": 4}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The shipped MLP config trained 50 steps data parallel and with fsdp=4
  on this process's 4 devices: {label: (workdir, bytes of parameters and
  optimizer state on device 0, FLOPs per step)}."""
  base = tmp_path_factory.mktemp("fsdp")
  out = {}
  for label, fsdp in (("dp", 1), ("fsdp4", 4)):
    workdir = str(base / label)
    trainer = _train(_mlp_config(fsdp), workdir)
    out[label] = (workdir, _device0_bytes(trainer.state),
                  trainer.records[0].throughput.flops_per_step)
    if label == "fsdp4":
      specs = {sharding.leaf_name(p): leaf.sharding.spec for p, leaf in
               jax.tree_util.tree_leaves_with_path(trainer.state)}
      # Stacked state: a leading trial axis, then the array's own.
      assert specs["params/Dense_1/kernel"] == P(None, None, "fsdp")
      assert specs["opt_state/moments/m/Dense_0/kernel"] == P(None, None, "fsdp")
      assert specs["params/Dense_2/kernel"] == P(None, "fsdp", None)
      assert specs["params/Dense_2/bias"] == P()  # 10: not divisible by 4.
  return out


def test_fsdp_trains_as_data_parallel_with_a_quarter_of_the_state(runs):
  (dp, dp_bytes, dp_flops), (fsdp, fsdp_bytes, fsdp_flops) = runs["dp"], runs["fsdp4"]
  _assert_close(_rows(fsdp), _rows(dp), rel=1e-5)
  assert [r["step"] for r in _rows(fsdp)][-1] == 50
  # Parameters and Adam's two moments: every array but the 10-element bias
  # of the last layer (and the step count) is split 4 ways.
  ratio = dp_bytes / fsdp_bytes
  assert 3.8 < ratio < 4.0, (dp_bytes, fsdp_bytes)
  # The FLOPs that MFU divides, as XLA counts what every device executes:
  # the forward and backward passes alike; the optimizer's update once
  # under fsdp=4 (each device updates its quarter), where data parallelism
  # repeats it on every device (measured: 11% of the MLP's step).
  assert 0.8 * dp_flops < fsdp_flops < dp_flops, (fsdp_flops, dp_flops)
  for workdir in (dp, fsdp):
    assert helpers.read_json(os.path.join(workdir, "summary.json"))["status"] == "completed"


@pytest.mark.parametrize("mesh", [{"data": 2, "fsdp": 2}, {"data": 4, "fsdp": 1}])
def test_an_fsdp4_checkpoint_resumes_on_another_mesh(runs, mesh, tmp_path):
  fsdp = runs["fsdp4"][0]
  # The fsdp=4 run as if stopped after its checkpoint at step 30.
  workdir = str(tmp_path / "resumed")
  shutil.copytree(fsdp, workdir)
  os.remove(os.path.join(workdir, "summary.json"))
  for name in os.listdir(os.path.join(workdir, "checkpoints")):
    if name.isdigit() and int(name) > 30:
      shutil.rmtree(os.path.join(workdir, "checkpoints", name))
  assert max(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints"))
             if n.isdigit()) == 30
  config = _mlp_config(mesh["fsdp"], **{"sharding.mesh.data": mesh["data"]})
  trainer = train.Trainer([config], [workdir], [train.validate_before_compiling(config)])
  assert trainer.step == 30
  fsdp_size = mesh["fsdp"]
  specs = [leaf.sharding.spec for leaf in jax.tree.leaves(trainer.state.params)]
  assert (P(None, None, "fsdp") in specs) == (fsdp_size > 1), specs
  trainer.run()
  # Steps 31..50 continue as the uninterrupted run did (and as plain data
  # parallelism would have).
  _assert_close(_rows(workdir), _rows(fsdp), rel=1e-5, first_step=31)
  _assert_close(_rows(workdir), _rows(runs["dp"][0]), rel=1e-5, first_step=31)
  # The work directory keeps the config it started with.
  with open(os.path.join(workdir, records.CONFIG_FILE)) as f:
    assert json.load(f)["sharding"]["mesh"] == {"data": -1, "fsdp": 4}


def test_two_processes_with_fsdp4_match_one_process(runs, tmp_path):
  job = str(tmp_path / "2x2")
  flags = [f"--config.{k}={v}" for k, v in
           {**RUN, "sharding.mesh.fsdp": 4,
            "data.data_dir": os.environ["TFDS_DATA_DIR"]}.items()]
  command = helpers.main_command(job, *flags, config=MLP_CONFIG)
  for rc, err in helpers.wait_all(helpers.start_processes(command, 2, 2), timeout=400):
    assert rc == 0, err[-4000:]
  _assert_close(_rows(job), _rows(runs["fsdp4"][0]), rel=1e-4)
  assert helpers.read_json(os.path.join(job, "summary.json"))["status"] == "completed"


def test_ghost_batch_norm_and_a_population_under_fsdp(tmp_path):
  # The tiny workload with ghost BatchNorm (groups of 4 of a batch of 16),
  # clipping and EMA; two trials as one population on a 2 x 2 mesh (its
  # 6-feature arrays split in 2) against each trial alone, data parallel.
  common = {"model.use_batch_norm": True, "batch_norm.policy": "ghost",
            "batch_norm.virtual_batch_size": 4, "grad_clip_norm": 0.5,
            "ema_decay": 0.9, "sharding.fsdp_min_size": 0, "max_train_steps": 15}
  configs = {lr: helpers.load_config(**common, **{"optimizer.learning_rate": lr})
             for lr in (0.05, 0.2)}
  sharded = []
  for config in configs.values():
    config = config.copy_and_resolve_references()
    config.sharding.mesh = {"data": 2, "fsdp": 2}
    sharded.append(config)
  dirs = [str(tmp_path / f"population{i}") for i in range(2)]
  workloads = [train.validate_before_compiling(c) for c in sharded]
  trainer = train.Trainer(sharded, dirs, workloads)
  assert any("fsdp" in leaf.sharding.spec for leaf in jax.tree.leaves(trainer.state.params))
  trainer.run()
  for i, config in enumerate(configs.values()):
    alone = str(tmp_path / f"alone{i}")
    train.train_and_evaluate(config, alone)
    rows, ref = _rows(dirs[i]), _rows(alone)
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    for row, ref_row in zip(rows, ref):
      for key in ("train/loss", "train/grad_norm", "eval/validation/loss",
                  "eval_ema/validation/loss"):
        if key in ref_row:
          assert row[key] == pytest.approx(ref_row[key], rel=1e-5), (row["step"], key)
