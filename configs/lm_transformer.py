r"""LM1B, byte-level decoder-only Transformer (6 x 512): ~1.3 bits/byte (estimate).

  python -m tuning_playbook.main --config=configs/lm_transformer.py \
      --workdir=/tmp/lm_transformer

Needs an accelerator (and TFDS downloads and prepares LM1B, a 1.7 GB archive
of 30M sentences, once, on first use). 19M parameters; Adam (beta2 0.98), lr 1e-3
after 1000 steps of linear warmup prepended to 49,000 steps (max_train_steps)
of cosine decay to 0, decoupled weight decay 0.1, gradient clipping at norm 1,
bfloat16 compute; batch 256 sentences cut or padded to 128 bytes (at most 32768
target bytes a step), 50k steps in all (under half an epoch, hence no
dropout).

Expected, an estimate that has not been measured yet: eval/validation/loss
about 0.9 nats per byte, i.e. 1.2-1.4 bits per byte (loss / ln 2), and a
per-byte eval/validation/accuracy of 0.70-0.75. Loss and accuracy are per
target byte (the end mark included; padding excluded); num_targets counts them.
Throughput without the data set: --config.data.synthetic=True.
"""

import ml_collections

from tuning_playbook import config_schema


def get_config() -> ml_collections.ConfigDict:
  config = config_schema.base_config()
  config.workload = "lm_transformer"
  config.model = ml_collections.ConfigDict({
      "num_layers": 6, "emb_dim": 512, "num_heads": 8, "mlp_dim": 2048,
      "dropout_rate": 0.0, "max_len": 128, "position_embedding": "learned",
      "tied_embedding": True})
  config.compute_dtype = "auto"  # bfloat16 on TPUs and GPUs, float32 on CPUs.
  config.batch_size = 256
  config.eval_batch_size = 1024
  # The decay's steps; the 1000 warmup steps are prepended (50,000 in all).
  config.max_train_steps = 49_000
  config.eval_every_steps = 2000
  config.log_every_steps = 200
  config.best_metric = "eval/validation/loss"
  config.best_mode = "min"
  config.grad_clip_norm = 1.0
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.beta1 = 0.9
  config.optimizer.beta2 = 0.98
  config.optimizer.epsilon = 1e-9
  config.optimizer.weight_decay = 0.1
  config.optimizer.weight_decay_type = "decoupled"
  config.optimizer.schedule = "cosine"
  # 1000 steps per 49,000 of decay, and the same share of a
  # --config.max_train_steps.
  config.optimizer.warmup_steps = config.get_ref("max_train_steps") // 49
  config.data.max_length = 128
  # 30M sentences: tf.data's in-memory cache would hold gigabytes of text.
  config.data.cache = False
  return config
