"""Analyses a study: every plot the playbook relies on, and what they show.

  python -m tuning_playbook.analyze --study_dir=/tmp/studies/lr

writes /tmp/studies/lr/report/index.html (open it from disk; it needs no
network) with its PNGs beside it, and report/findings.json with one entry per
finding. Unfinished or failed trials are reported, not fatal.

  python -m tuning_playbook.analyze --tracking_table=/tmp/studies/studies.csv

writes the report of every study in the tracking table and the tuning log
beside it (tuning_log.html: the chain of studies, see analysis/tuning_log.py).
"""

import dataclasses
import os

from absl import app
from absl import flags

from tuning_playbook.analysis import findings
from tuning_playbook.analysis import report
from tuning_playbook.analysis import study_data
from tuning_playbook.analysis import tuning_log
from tuning_playbook.common import cli
from tuning_playbook.common import json_records
from tuning_playbook import procedures

_STUDY_DIR = flags.DEFINE_string("study_dir", None, "The study directory (holds study.json).")
_TRACKING_TABLE = flags.DEFINE_string(
    "tracking_table", None, "Or a tracking table (studies.csv): every study's "
    "report and the tuning log beside the table.")
_REPORT_DIR = flags.DEFINE_string("report_dir", None, "Where to write; default <study_dir>/report.")
_TOP_K = flags.DEFINE_integer(
    "top_k", findings.Thresholds.top_k,
    "Best trials per scientific value whose curves and gradients are examined.",
    lower_bound=1)
flags.mark_flags_as_mutual_exclusive(["study_dir", "tracking_table"],
                                     required=True)


def _write_log() -> None:
  thresholds = dataclasses.replace(findings.Thresholds(), top_k=_TOP_K.value)
  path = _TRACKING_TABLE.value
  if not os.path.isfile(path):
    cli.fail(f"--tracking_table={path}: no such file (a sweep or playbook "
             "launch writes <parent of study_dir>/studies.csv)")
  try:
    log_path, _ = tuning_log.write_log(path, procedures.report_hook,
                                       thresholds=thresholds)
  except (KeyError, ValueError) as e:
    cli.fail(f"--tracking_table={path}: not a tracking table ({e})")
  print(f"Tuning log: {log_path}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _TRACKING_TABLE.value:
    _write_log()
    return
  thresholds = dataclasses.replace(findings.Thresholds(), top_k=_TOP_K.value)
  try:
    study = study_data.load_study(_STUDY_DIR.value)
    result = report.write_report(study, _REPORT_DIR.value, thresholds,
                                 procedures.report_hook(study))
  except (study_data.StudyError, json_records.RecordFileError) as e:
    cli.fail(str(e))
  for finding in sorted(result.findings, key=lambda f: f.severity != "warning"):
    print(f"[{finding.severity}] {finding.message}")
  print(f"Report: {result.index_html}")
  print(f"Findings: {result.findings_json}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
