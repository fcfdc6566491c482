"""FLOPs per train step from XLA's cost analysis vs the analytic count.

  python benchmarks/workload_flops.py [--workloads=imagenet_resnet50,...] \
      [--batch_size=8]

For each shipped accelerator-scale workload this runs the ordinary command

  python -m tuning_playbook.main --config=configs/<workload>.py \
      --config.data.synthetic=True --config.max_train_steps=3 \
      --config.batch_size=<batch_size> --workdir=<tmp>

and compares `perf.flops_per_step` in its summary.json with the analytic
training cost: 3 x the forward pass's multiply-adds x 2 FLOPs (the backward
pass costs about twice the forward: the gradients of the activations and of
the weights). The forward counts are the matmuls and convolutions only, taken
from the run's resolved config.json (model size, image size, sequence
length). One line per workload, then `ratio=<the ratio furthest from 1>`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

_WORKLOADS = flags.DEFINE_list(
    "workloads", ["imagenet_resnet50", "imagenet_vit", "lm_transformer"],
    "Configs in configs/ to measure.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Global batch of the runs.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def resnet_forward_macs(model: dict) -> float:
  """Multiply-adds of one image through ResNet v1.5 (convolutions and head)."""
  blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3),
            101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}[model["depth"]]
  bottleneck = model["depth"] >= 50
  width = [int(c * model["width_multiplier"]) for c in (64, 128, 256, 512)]
  side = -(-model["image_size"] // 2)  # The 7x7 stride-2 stem.
  macs = side * side * 7 * 7 * 3 * width[0]
  side = -(-side // 2)  # Max pooling.
  channels = width[0]
  for stage, (count, features) in enumerate(zip(blocks, width)):
    for block in range(count):
      stride = 2 if stage > 0 and block == 0 else 1
      out_side = -(-side // stride)
      out = features * 4 if bottleneck else features
      if bottleneck:
        macs += side * side * channels * features  # 1x1.
        macs += out_side * out_side * 9 * features * features  # Strided 3x3.
        macs += out_side * out_side * features * out  # 1x1, x4.
      else:
        macs += out_side * out_side * 9 * channels * features
        macs += out_side * out_side * 9 * features * features
      if stride != 1 or channels != out:
        macs += out_side * out_side * channels * out  # Projection shortcut.
      channels, side = out, out_side
  return macs + channels * model["num_classes"]


def vit_forward_macs(model: dict) -> float:
  """Multiply-adds of one image through a ViT encoder (Dosovitskiy et al.)."""
  from workloads import imagenet_vit  # pylint: disable=g-import-not-at-top
  size, patch = model["variant"].split("/")
  hidden, depth, _, mlp = imagenet_vit.SIZES[size]
  hidden = model.get("hidden_size") or hidden
  depth = model.get("depth") or depth
  mlp = model.get("mlp_dim") or mlp
  patch = model.get("patch_size") or int(patch)
  tokens = (model["image_size"] // patch) ** 2 + (model["pool"] == "token")
  per_layer = (tokens * (4 * hidden * hidden + 2 * hidden * mlp)  # qkv, out, MLP.
               + 2 * tokens * tokens * hidden)  # Scores and weighted values.
  embed = (model["image_size"] // patch) ** 2 * patch * patch * 3 * hidden
  return embed + depth * per_layer + hidden * model["num_classes"]


def lm_forward_macs(model: dict, length: int) -> float:
  """Multiply-adds of one sequence through the decoder (full attention
  matrices, as the model computes them under the causal mask)."""
  from workloads import lm_transformer  # pylint: disable=g-import-not-at-top
  d, mlp = model["emb_dim"], model["mlp_dim"]
  per_layer = length * (4 * d * d + 2 * d * mlp) + 2 * length * length * d
  return model["num_layers"] * per_layer + length * d * lm_transformer.VOCAB_SIZE


def analytic_train_flops(config: dict) -> float:
  """3 x forward multiply-adds x 2 FLOPs, for the whole global batch."""
  import importlib  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  name = config["workload"]
  # config.model holds only the fields a config sets; the workload adds its
  # defaults.
  module = importlib.import_module(f"workloads.{name}")
  model = module.model_config(ml_collections.ConfigDict(config)).to_dict()
  if name == "imagenet_resnet50":
    macs = resnet_forward_macs(model)
  elif name == "imagenet_vit":
    macs = vit_forward_macs(model)
  elif name == "lm_transformer":
    macs = lm_forward_macs(model, config["data"]["max_length"])
  else:
    raise ValueError(f"no analytic count for workload {name!r}")
  return 3 * 2 * macs * config["batch_size"]


def measure(workload: str, batch_size: int, workdir: str) -> tuple[float, float]:
  """(XLA's FLOPs per step, the analytic count) of a 3-step synthetic run."""
  command = [sys.executable, "-m", "tuning_playbook.main",
             f"--config={os.path.join(REPO, 'configs', workload + '.py')}",
             "--config.data.synthetic=True", "--config.max_train_steps=3",
             f"--config.batch_size={batch_size}", f"--workdir={workdir}"]
  subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
  with open(os.path.join(workdir, "summary.json")) as f:
    measured = json.load(f)["perf"]["flops_per_step"]
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  return measured, analytic_train_flops(config)


def main(argv):
  del argv
  sys.path.insert(0, REPO)
  worst = 1.0
  with tempfile.TemporaryDirectory() as root:
    for workload in _WORKLOADS.value:
      measured, analytic = measure(workload, _BATCH.value, os.path.join(root, workload))
      ratio = measured / analytic
      print(f"{workload}: batch {_BATCH.value}, XLA {measured:.4g} FLOPs/step, "
            f"analytic {analytic:.4g}, ratio {ratio:.3f}", flush=True)
      worst = ratio if abs(ratio - 1) > abs(worst - 1) else worst
  print(f"ratio={worst:.3f}")


if __name__ == "__main__":
  app.run(main)
