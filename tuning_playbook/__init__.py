"""tuning_playbook: a JAX/Flax training framework with the Deep Learning Tuning Playbook built in.

Importing this package starts no JAX backend and gives TensorFlow no accelerator.
"""

__version__ = "0.1.0"
