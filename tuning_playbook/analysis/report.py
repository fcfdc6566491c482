"""Builds a study's report: runs every check, draws every figure, writes files.

  study = study_data.load_study("/tmp/studies/lr")
  result = report.write_report(study, procedure=procedures.report_hook(study))
  # -> /tmp/studies/lr/report/index.html, findings.json and the PNGs beside them.

The analysis does not import the playbook procedures (they import it): the
caller hands in the `ProcedureHook` of the procedure that planned the study.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from typing import Any, Callable, Mapping

from tuning_playbook.analysis import bootstrap
from tuning_playbook.analysis import curve_checks
from tuning_playbook.analysis import findings as findings_lib
from tuning_playbook.analysis import gradient_checks
from tuning_playbook.analysis import high_loss
from tuning_playbook.analysis import isolation
from tuning_playbook.analysis import loss_spikes
from tuning_playbook.analysis import loss_trend
from tuning_playbook.analysis import next_steps
from tuning_playbook.analysis import report_html
from tuning_playbook.analysis import report_sections
from tuning_playbook.analysis.report_html import Image, Section
from tuning_playbook.analysis import search_space_checks
from tuning_playbook.analysis import study_data
from tuning_playbook.analysis import throughput_checks
from tuning_playbook.common import atomic_files

REPORT_DIR = "report"
FINDINGS_FILE = "findings.json"
INDEX_FILE = "index.html"

# The finding that names the general checks a procedure study leaves out;
# it is shown in the procedure's section.
PROCEDURE_CHECKS = "procedure_checks"
SECTION_OF_KIND = {
    "overfitting": "curves", "late_variance": "curves",
    "still_improving": "curves", "saturated": "curves", "curves_ok": "curves",
    "curves_missing": "curves", "training_loss_increasing": "curves",
    "loss_spikes": "curves",
    "clipping_threshold": "gradients", "aggressive_clipping": "gradients",
    "gradient_outliers": "gradients", "not_enough_trials": "sampling",
    "sampling": "sampling", "input_bound": "leaderboard",
}


@dataclasses.dataclass(frozen=True)
class ReportResult:
  report_dir: str
  index_html: str
  findings_json: str
  findings: list[findings_lib.Finding]
  images: list[str]


IMAGE_PREFIXES = ("axis_", "isolation_", "curves_", "grad_", "coverage",
                  "best_step", "bootstrap", "procedure_")

# save_figure(matplotlib Figure, name, caption) -> its Image in the report
# (None for no figure).
SaveFigure = Callable[[Any, str, str], Image | None]
# analyze(study, save_figure) -> (findings, section)
ProcedureAnalysis = Callable[[study_data.Study, SaveFigure],
                             tuple[list[findings_lib.Finding], Section]]


@dataclasses.dataclass(frozen=True)
class ProcedureHook:
  """What the report takes from the playbook procedure that planned a study.

  `analyze` gives the procedure's findings and section; `checks_left_out`
  maps each kind of general finding that does not apply to its studies to
  why. A procedure that cannot be loaded has no `analyze`, and `error` says
  why.
  """
  name: str
  analyze: ProcedureAnalysis | None = None
  checks_left_out: Mapping[str, str] = dataclasses.field(default_factory=dict)
  error: str | None = None


def _procedure_analysis(study, writer, procedure: ProcedureHook | None
                        ) -> tuple[list[findings_lib.Finding], Section | None]:
  """The findings and section of the procedure that planned the study."""
  if procedure is None:
    return [], None
  if procedure.analyze is None:
    return [findings_lib.Finding(
        "procedure/unknown", "procedure", findings_lib.WARNING,
        f"study.json names the procedure {procedure.name!r}, which cannot be "
        f"analysed: {procedure.error}", {"procedure": procedure.name})], None
  def save_figure(fig, figure_name: str, caption: str):
    return writer.image(fig, f"procedure_{figure_name}", caption)
  return procedure.analyze(study, save_figure)


def _without_checks_left_out(found: list[findings_lib.Finding],
                             procedure: ProcedureHook | None
                             ) -> list[findings_lib.Finding]:
  """Drops the general findings that the study's procedure leaves out, and
  says which it dropped."""
  left_out = dict(procedure.checks_left_out) if procedure else {}
  dropped = {f.kind: left_out[f.kind] for f in found if f.kind in left_out}
  if not dropped:
    return found
  kept = [f for f in found if f.kind not in left_out]
  return kept + [findings_lib.Finding(
      PROCEDURE_CHECKS, PROCEDURE_CHECKS, findings_lib.INFO,
      f"General checks left out for this {procedure.name} study: "
      + "; ".join(f"{kind} ({why})" for kind, why in sorted(dropped.items()))
      + ".", {"procedure": procedure.name, "left_out": dropped})]


def _clear_old_images(report_dir: str) -> None:
  """Removes figures of an earlier report (trials may have changed since)."""
  for path in glob.glob(os.path.join(report_dir, "*.png")):
    if os.path.basename(path).startswith(IMAGE_PREFIXES):
      os.remove(path)


@dataclasses.dataclass(frozen=True)
class Analysis:
  """Everything the checks computed about a study, before any drawing."""
  study: study_data.Study
  curve_groups: list[tuple[str, list[study_data.Trial]]]
  curve_flags: dict[str, curve_checks.CurveFlags]
  gradient_stats: list[gradient_checks.GradientStats]
  bootstrap: bootstrap.BootstrapResult | None
  findings: list[findings_lib.Finding]


def analyse(study: study_data.Study,
            thresholds: findings_lib.Thresholds = findings_lib.Thresholds(),
            procedure: ProcedureHook | None = None) -> Analysis:
  """Runs every check on a loaded study; `procedure`: the hook of the
  procedure that planned it (None: an ordinary study)."""
  groups = isolation.curve_groups(study, thresholds.top_k)
  best_ids = list(dict.fromkeys(t.trial_id for _, ts in groups for t in ts))
  flags = curve_checks.examine_all(study, thresholds)
  stats = [s for s in (gradient_checks.stats(t, thresholds)
                       for t in isolation.gradient_trials(study, thresholds.top_k)) if s]
  result = bootstrap.run(study, thresholds)
  found = (search_space_checks.check(study, thresholds)
           + curve_checks.check(study, flags, best_ids, thresholds)
           + gradient_checks.check(stats, thresholds)
           + bootstrap.check(study, result, thresholds)
           + throughput_checks.check(study, thresholds)
           + loss_trend.check(study, thresholds)
           + loss_spikes.check(study, thresholds)
           + high_loss.check(study, thresholds))
  found = _without_checks_left_out(found, procedure)
  found = next_steps.attach(study, found, thresholds)
  return Analysis(study, groups, flags, stats, result, found)


def write_report(study: study_data.Study, report_dir: str | None = None,
                 thresholds: findings_lib.Thresholds = findings_lib.Thresholds(),
                 procedure: ProcedureHook | None = None) -> ReportResult:
  """Analyses a loaded study; writes index.html, findings.json and the PNGs
  (into <study_dir>/report by default). `procedure`: the hook of the
  procedure that planned the study (None: an ordinary study)."""
  study_dir = study.study_dir
  analysis = analyse(study, thresholds, procedure)
  report_dir = report_dir or os.path.join(study_dir, REPORT_DIR)
  os.makedirs(report_dir, exist_ok=True)
  _clear_old_images(report_dir)
  writer = report_sections.FigureWriter(report_dir)
  sections = [
      report_sections.axis_section(study, writer), report_sections.isolation_section(study, writer),
      report_sections.curves_section(study, writer, analysis.curve_groups, analysis.curve_flags),
      report_sections.gradient_section(study, writer, analysis.gradient_stats),
      report_sections.search_space_section(study, writer, thresholds),
      report_sections.sampling_section(study, writer, analysis.bootstrap),
      report_sections.leaderboard_section(study, report_dir, thresholds)]
  by_id = {s.id: s for s in sections}
  procedure_findings, procedure_section = _procedure_analysis(
      study, writer, procedure)
  for finding in analysis.findings:
    if finding.kind == PROCEDURE_CHECKS and procedure_section is not None:
      procedure_section.findings.append(finding)
    else:
      by_id[SECTION_OF_KIND.get(finding.kind, "search_space")].findings.append(finding)
  if procedure_section is not None:
    procedure_section.findings[:0] = procedure_findings
    sections.insert(0, procedure_section)
  all_findings = procedure_findings + analysis.findings

  index = os.path.join(report_dir, INDEX_FILE)
  atomic_files.write_text(index, report_html.render(study, sections,
                                                    all_findings))
  findings_path = os.path.join(report_dir, FINDINGS_FILE)
  payload = {"study": study.name, "study_dir": os.path.abspath(study_dir),
             "objective": {"metric": study.objective.metric,
                           "mode": study.objective.mode},
             "num_trials": len(study.trials),
             "findings": [f.to_json() for f in all_findings]}
  if study.procedure:
    payload["procedure"] = study.procedure
  atomic_files.write_json(findings_path, payload, allow_nan=False)
  return ReportResult(report_dir, index, findings_path, all_findings,
                      writer.files)
