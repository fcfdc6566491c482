"""Training one config, or a population of trials of one structure.

The set-up steps (`trial_setup`), the one trainer (`train.Trainer`), its
jitted steps (`train_step`, `optimizers`), sharding over the device mesh
(`sharding`), evaluation, checkpointing and the records a trial writes
(`trial_records`), input on the device (`in_memory_stream`,
`device_examples`), throughput, profiling, the watchdog and preemption.
`run.run_trial` is what `tuning_playbook.main` and a study worker call.

It imports `common` and the workload interface, never `studies`,
`analysis` or `procedures`.
"""
