"""Studies: search spaces, quasi-random sampling, planning, running and
tracking trials.

Search spaces and their dimensions (`search_space`, `dimension`, `halton`),
a study's plan and record (`study`), the command lines (`commands`), the
launch (`study_launch`, `study_flags`, `study_runner`, `worker_devices`,
`slurm`), a runner's hold on a trial (`trial_lease`, `trial_claims`) and the
tracking tables (`tracking`).

It imports `common` and the workload interface, never `training` (a study
worker, an entry point, joins the two), `analysis` or `procedures`.
"""
