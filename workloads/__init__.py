"""Workload modules: `config.workload = "<name>"` imports `workloads/<name>.py`.

See `tuning_playbook/workload.py` for the names a workload module exposes.
"""
