"""Analysis of a finished (or partly finished) study: findings, plots, report.

  python -m tuning_playbook.analyze --study_dir=D

writes `D/report/index.html` and `D/report/findings.json`. Importing this
package starts no JAX backend.
"""
