"""The tuning log: a project's studies as one chain, from its tracking table.

  python -m tuning_playbook.analyze --tracking_table=runs/studies.csv

writes each study's report (as `analyze --study_dir` does) and, beside the
table, `tuning_log.html`: every study of the table under the study it
started from (`--from_study`), with what it is (procedure or sweep), the code
version that ran it, its trials and best value, what it found (the
procedure's own findings, or the warnings of an ordinary study), the
commands those findings suggest, the command that ran it, and a link to its
report. A study whose records cannot be read is listed with the reason.
"""

from __future__ import annotations

import dataclasses
import html
import os
from typing import Callable, Sequence

from tuning_playbook.analysis import findings as findings_lib
from tuning_playbook.analysis import report
from tuning_playbook.analysis import report_html
from tuning_playbook.analysis import study_data
from tuning_playbook.common import atomic_files
from tuning_playbook.common import json_records
from tuning_playbook.studies import tracking

LOG_FILE = "tuning_log.html"
HookOf = Callable[[study_data.Study], "report.ProcedureHook | None"]


@dataclasses.dataclass
class Entry:
  """One study of the log."""
  row: dict[str, str]
  study_dir: str
  parent: str | None = None
  procedure: str | None = None
  report_html: str | None = None
  findings: list[findings_lib.Finding] = dataclasses.field(default_factory=list)
  error: str | None = None
  children: list["Entry"] = dataclasses.field(default_factory=list)


def _study_dir(row: dict[str, str], table_dir: str) -> str:
  """The row's directory: as recorded, else relative to the table."""
  path = row.get("study_dir", "")
  if os.path.isabs(path) or os.path.isdir(path):
    return os.path.abspath(path)
  return os.path.abspath(os.path.join(table_dir, path))


def _parent(study: study_data.Study) -> str | None:
  source = ((study.procedure or {}).get("parameters") or {}).get("from_study") or {}
  for key in ("abs_study_dir", "study_dir"):
    if source.get(key):
      return os.path.abspath(source[key])
  return None


def _entry(row: dict[str, str], table_dir: str, hook_of: HookOf,
           thresholds: findings_lib.Thresholds) -> Entry:
  entry = Entry(row, _study_dir(row, table_dir))
  try:
    study = study_data.load_study(entry.study_dir)
    result = report.write_report(study, None, thresholds, hook_of(study))
  except (study_data.StudyError, json_records.RecordFileError, OSError) as e:
    entry.error = str(e)
    return entry
  entry.parent, entry.report_html = _parent(study), result.index_html
  entry.procedure = (study.procedure or {}).get("name")
  own = [f for f in result.findings if entry.procedure and f.kind == entry.procedure]
  entry.findings = own or [f for f in result.findings
                           if f.severity == findings_lib.WARNING]
  return entry


def build(table_path: str, hook_of: HookOf,
          thresholds: findings_lib.Thresholds = findings_lib.Thresholds()
          ) -> list[Entry]:
  """The table's studies as trees: roots, each with the studies started
  from it (a study whose source is not in the table is a root)."""
  table_dir = os.path.dirname(os.path.abspath(table_path))
  entries = [_entry(row, table_dir, hook_of, thresholds)
             for row in tracking.read_tracking_table(table_path)]
  by_dir = {e.study_dir: e for e in entries}
  roots = []
  for e in entries:
    parent = by_dir.get(e.parent) if e.parent else None
    (parent.children if parent is not None and parent is not e else roots).append(e)
  return roots


def _e(text) -> str:
  return html.escape(str(text), quote=True)


def _number(text: str | None) -> str:
  try:
    return findings_lib.fmt(float(text))
  except (TypeError, ValueError):
    return "-"


def _render_entry(e: Entry, log_dir: str) -> str:
  row = e.row
  link = (f' · <a href="{_e(os.path.relpath(e.report_html, log_dir))}">report</a>'
          if e.report_html else "")
  kind = f"playbook {e.procedure}" if e.procedure else "sweep"
  parts = [f'<li class="study" id="study-{_e(row.get("study", ""))}">',
           f"<b>{_e(row.get('study', ''))}</b> <span class=\"meta\">({_e(kind)}, "
           f"<code>{_e(e.study_dir)}</code>){link}</span>",
           f'<div class="meta">{_e(row.get("num_trials"))} trials: '
           f"{_e(row.get('num_completed'))} completed, "
           f"{_e(row.get('num_infeasible'))} infeasible, "
           f"{_e(row.get('num_unfinished'))} unfinished; best "
           f"{_e(row.get('best_metric'))} = {_e(_number(row.get('best_value')))} "
           f"(trial {_e(row.get('best_trial') or '-')}); code "
           f"<code>{_e(row.get('code_version') or 'unknown')}</code>; updated "
           f"{_e(row.get('updated'))}</div>"]
  if e.error:
    parts.append(f'<div class="finding warning">Cannot be read: {_e(e.error)}</div>')
  parts += [report_html.finding_html(f) for f in e.findings]
  parts.append(f'<div class="meta">Ran: <code>{_e(row.get("command", ""))}</code></div>')
  if e.children:
    parts.append("<ul>" + "".join(_render_entry(c, log_dir) for c in e.children)
                 + "</ul>")
  parts.append("</li>")
  return "\n".join(parts)


def render(roots: Sequence[Entry], table_path: str, log_dir: str) -> str:
  """The whole page."""
  count = [0]

  def walk(es):
    for e in es:
      count[0] += 1
      walk(e.children)
  walk(roots)
  return "\n".join([
      "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
      "<title>Tuning log</title>",
      f"<style>{report_html.STYLE} ul {{ padding-left: 28px; "
      "border-left: 2px solid #cfdbe8; } li.study { margin: 10px 0; }</style>",
      "</head><body>", "<h1>Tuning log</h1>",
      f'<p class="meta">{count[0]} studies of <code>{_e(table_path)}</code>; '
      "each study is listed under the study it started from (--from_study), "
      "with what it found and the command that ran it.</p>",
      '<ul class="roots">' + "".join(_render_entry(e, log_dir) for e in roots)
      + "</ul>", "</body></html>", ""])


def write_log(table_path: str, hook_of: HookOf, log_path: str | None = None,
              thresholds: findings_lib.Thresholds = findings_lib.Thresholds()
              ) -> tuple[str, list[Entry]]:
  """Writes every study's report and the log page; (its path, the roots)."""
  roots = build(table_path, hook_of, thresholds)
  log_path = log_path or os.path.join(
      os.path.dirname(os.path.abspath(table_path)), LOG_FILE)
  atomic_files.write_text(log_path, render(roots, table_path,
                                           os.path.dirname(log_path)))
  return log_path, roots
