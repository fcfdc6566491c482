"""Importing the package starts no JAX backend and gives TensorFlow no accelerator."""

import subprocess
import sys

from tests import helpers

_PROBE = r"""
import importlib, pkgutil, sys
import tuning_playbook, workloads
names = [m.name for m in pkgutil.walk_packages(tuning_playbook.__path__, "tuning_playbook.")
         if not m.name.endswith(("main", "sweep", "analyze", "study_worker", "__main__"))]
names += ["workloads." + m.name for m in pkgutil.iter_modules(workloads.__path__)]
for name in names:
  importlib.import_module(name)
from jax._src import xla_bridge
assert not xla_bridge._backends, f"backends started: {list(xla_bridge._backends)}"
if "tensorflow" in sys.modules:
  # TensorFlow claims accelerator memory when its runtime starts; importing
  # must not start it.
  from tensorflow.python.eager import context
  assert not context.context()._initialized, "TensorFlow runtime started on import"
from tuning_playbook import input_pipeline
input_pipeline.hide_accelerators_from_tensorflow()
import tensorflow as tf
assert tf.config.get_visible_devices("GPU") == [] and tf.config.get_visible_devices("TPU") == []
assert not xla_bridge._backends
print("imported", len(names))
"""


def test_importing_every_module_starts_no_backend():
  result = subprocess.run([sys.executable, "-c", _PROBE], cwd=helpers.REPO,
                          env=helpers.subprocess_env(), capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "imported" in result.stdout
