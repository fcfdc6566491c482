"""Analyses a study: every plot the playbook relies on, and what they show.

  python -m tuning_playbook.analyze --study_dir=/tmp/studies/lr

writes /tmp/studies/lr/report/index.html (open it from disk; it needs no
network) with its PNGs beside it, and report/findings.json with one entry per
finding. Unfinished or failed trials are reported, not fatal.
"""

import dataclasses

from absl import app
from absl import flags

from tuning_playbook.analysis import findings
from tuning_playbook.analysis import report
from tuning_playbook.analysis import study_data
from tuning_playbook.common import cli
from tuning_playbook.common import json_records
from tuning_playbook import procedures

_STUDY_DIR = flags.DEFINE_string("study_dir", None, "The study directory (holds study.json).")
_REPORT_DIR = flags.DEFINE_string("report_dir", None, "Where to write; default <study_dir>/report.")
_TOP_K = flags.DEFINE_integer(
    "top_k", findings.Thresholds.top_k,
    "Best trials per scientific value whose curves and gradients are examined.",
    lower_bound=1)
flags.mark_flag_as_required("study_dir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
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
