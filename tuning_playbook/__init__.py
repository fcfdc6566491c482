"""tuning_playbook: a JAX/Flax training framework with the Deep Learning Tuning Playbook built in.

The layout, from the bottom up (a module imports only from its own layer or
those below it):

  the workload interface   config_schema, config_paths, workload, layers,
                           batch_norm, input_pipeline, image_preprocessing,
                           study_presets: what configs/ and workloads/ import
  common/                  shared plumbing: trial records and statuses,
                           config checks, atomic files, CLI helpers, SIGTERM
  training/                one config or a population: set-up, the trainer,
                           steps, sharding, evaluation, checkpoints
  studies/                 search spaces, sampling, launching and tracking
  analysis/                a study's plots, findings and report
  procedures/              the playbook's procedures, built on the above
  entry points             main, sweep, playbook, analyze, study_worker
                           (`python -m tuning_playbook.<entry>`)

Importing this package starts no JAX backend and gives TensorFlow no accelerator.
"""

__version__ = "0.1.0"
