"""BatchNorm against a numpy reference, on one device and sharded over four."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from tuning_playbook import batch_norm
from tuning_playbook.common import cpu_devices

EPS = 1e-5
MOMENTUM = 0.9


def reference(x, group_size, scale, bias, ema_mean, ema_var):
  """Per-group normalization and the moving averages, in float64 numpy."""
  x = np.asarray(x, np.float64)
  features = x.shape[-1]
  groups = x.reshape((x.shape[0] // group_size, group_size) + x.shape[1:])
  axes = tuple(range(1, groups.ndim - 1))
  mean = groups.mean(axis=axes, keepdims=True)
  var = ((groups - mean) ** 2).mean(axis=axes, keepdims=True)
  y = ((groups - mean) / np.sqrt(var + EPS)).reshape(x.shape) * scale + bias
  new_mean = (MOMENTUM * ema_mean
              + (1 - MOMENTUM) * mean.reshape(-1, features).mean(0))
  new_var = (MOMENTUM * ema_var
             + (1 - MOMENTUM) * var.reshape(-1, features).mean(0))
  return y, new_mean, new_var


def random_variables(features, seed=0):
  rng = np.random.default_rng(seed)
  return {
      "params": {"scale": rng.uniform(0.5, 2.0, features).astype(np.float32),
                 "bias": rng.normal(size=features).astype(np.float32)},
      "batch_stats": {"mean": rng.normal(size=features).astype(np.float32),
                      "var": rng.uniform(0.5, 2.0, features).astype(np.float32)},
  }


def random_inputs(shape, seed=1):
  rng = np.random.default_rng(seed)
  # Per-example offsets make group statistics differ clearly from global ones.
  offsets = rng.normal(scale=3.0, size=(shape[0],) + (1,) * (len(shape) - 1))
  return (rng.normal(size=shape) * 2.0 + offsets + 1.0).astype(np.float32)


def apply_train(layer, variables, x):
  return layer.apply(variables, x, train=True, mutable=["batch_stats"])


def check_against_reference(layer, x, group_size):
  variables = random_variables(x.shape[-1])
  y, updates = apply_train(layer, variables, x)
  ref_y, ref_mean, ref_var = reference(
      x, group_size, variables["params"]["scale"], variables["params"]["bias"],
      variables["batch_stats"]["mean"], variables["batch_stats"]["var"])
  np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], ref_mean,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["var"], ref_var,
                             rtol=1e-5, atol=1e-5)
  return np.asarray(y)


def test_global_matches_reference_over_spatial_axes():
  x = random_inputs((16, 5, 3))
  check_against_reference(batch_norm.BatchNorm(policy="global"), x, 16)


def test_ghost_uses_groups_of_virtual_batch_size():
  x = random_inputs((16, 5, 3))
  ghost = check_against_reference(
      batch_norm.BatchNorm(policy="ghost", virtual_batch_size=4), x, 4)
  global_y, _ = apply_train(batch_norm.BatchNorm(policy="global"),
                            random_variables(3), x)
  assert not np.allclose(ghost, global_y, atol=1e-2)


def test_ghost_with_virtual_batch_size_equal_to_batch_is_global():
  x = random_inputs((8, 3))
  ghost = check_against_reference(
      batch_norm.BatchNorm(policy="ghost", virtual_batch_size=8), x, 8)
  global_y, _ = apply_train(batch_norm.BatchNorm(policy="global"),
                            random_variables(3), x)
  np.testing.assert_allclose(ghost, global_y, rtol=1e-6, atol=1e-6)


def test_per_device_groups_are_the_per_device_batch():
  x = random_inputs((12, 2, 4))
  check_against_reference(
      batch_norm.BatchNorm(policy="per_device", num_devices=3), x, 4)


def test_eval_uses_moving_averages_and_leaves_them_unchanged():
  x = random_inputs((6, 3))
  variables = random_variables(3)
  layer = batch_norm.BatchNorm(policy="ghost", virtual_batch_size=4)
  # 6 examples do not divide into groups of 4: eval must not care.
  y, updates = layer.apply(variables, x, train=False, mutable=["batch_stats"])
  stats, params = variables["batch_stats"], variables["params"]
  expected = ((x - stats["mean"]) / np.sqrt(stats["var"] + EPS)
              * params["scale"] + params["bias"])
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(updates["batch_stats"]["mean"], stats["mean"])
  np.testing.assert_array_equal(updates["batch_stats"]["var"], stats["var"])


def test_indivisible_batch_raises_naming_the_key():
  x = random_inputs((10, 3))
  layer = batch_norm.BatchNorm(policy="ghost", virtual_batch_size=4)
  with pytest.raises(ValueError, match=r"batch_norm\.virtual_batch_size=4"):
    apply_train(layer, random_variables(3), x)
  per_device = batch_norm.BatchNorm(policy="per_device", num_devices=4)
  with pytest.raises(ValueError, match="num_devices=4"):
    apply_train(per_device, random_variables(3), x)


def test_init_accepts_any_batch_and_starts_from_zero_mean_unit_var():
  layer = batch_norm.BatchNorm(policy="ghost", virtual_batch_size=4)
  variables = layer.init(jax.random.key(0), jnp.ones((1, 7)), train=True)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(7))
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(7))
  np.testing.assert_array_equal(variables["params"]["scale"], np.ones(7))
  np.testing.assert_array_equal(variables["params"]["bias"], np.zeros(7))


def test_from_config_sets_fields():
  config = ml_collections.ConfigDict(
      {"policy": "ghost", "virtual_batch_size": 16, "momentum": 0.99})
  layer = batch_norm.from_config(config, num_devices=2)(name="bn")
  assert (layer.policy, layer.virtual_batch_size, layer.momentum,
          layer.num_devices) == ("ghost", 16, 0.99, 2)
  default = batch_norm.from_config(config)()
  assert default.num_devices == jax.device_count()
  config.policy = "sync"
  with pytest.raises(ValueError, match="batch_norm.policy='sync'"):
    batch_norm.from_config(config)


def _sharded_main():
  """Runs in a subprocess with four CPU devices."""
  cpu_devices.configure_thread_pool()
  assert jax.device_count() == 4, jax.devices()
  cases = [  # (policy, global batch, virtual batch size, group size)
      ("global", 32, 0, 32),
      ("ghost", 32, 4, 4),     # Per-device batch 8 > virtual batch 4.
      ("ghost", 8, 4, 4),      # Per-device batch 2 < virtual batch 4.
      ("per_device", 32, 0, 8),
      ("global", 8, 0, 8),
  ]
  for axis_type in (AxisType.Explicit, AxisType.Auto):
    mesh = jax.make_mesh((4,), ("data",), axis_types=(axis_type,))
    sharding = NamedSharding(mesh, P("data"))
    for policy, batch, vbs, group in cases:
      layer = batch_norm.BatchNorm(policy=policy, virtual_batch_size=vbs,
                                   num_devices=4, momentum=MOMENTUM)
      x = random_inputs((batch, 3, 5), seed=batch + vbs)
      variables = random_variables(5)
      step = jax.jit(lambda v, x, layer=layer: apply_train(layer, v, x))
      x_sharded = jax.device_put(x, sharding)
      assert len(x_sharded.addressable_shards) == 4
      y, updates = step(variables, x_sharded)
      if axis_type == AxisType.Explicit:
        assert y.sharding.spec[0] == "data", y.sharding
      ref_y, ref_mean, ref_var = reference(
          x, group, variables["params"]["scale"], variables["params"]["bias"],
          variables["batch_stats"]["mean"], variables["batch_stats"]["var"])
      np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-4)
      np.testing.assert_allclose(updates["batch_stats"]["mean"], ref_mean,
                                 rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(updates["batch_stats"]["var"], ref_var,
                                 rtol=1e-5, atol=1e-5)
      print(f"checked {axis_type} {policy} batch={batch} vbs={vbs}")
  print("ALL SHARDED CASES MATCH")


def test_statistics_under_jit_sharded_over_four_devices():
  from tests import helpers  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(4),
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, __file__], env=env,
                          capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "ALL SHARDED CASES MATCH" in result.stdout, result.stdout
  assert result.stdout.count("checked ") == 10


if __name__ == "__main__":
  _sharded_main()
