"""Renders the report as one self-contained HTML page (works offline, from disk).

Images and record links are relative to the page; there are no external
resources. On load, a small inline script checks that every image decoded and
records the result on <body> (data-images-status="ok" | "failed"), and marks a
broken image visibly.

  html = report_html.render(study, sections, findings)
"""

from __future__ import annotations

import dataclasses
import html
from typing import Any, Sequence

from tuning_playbook.analysis import findings as findings_lib
from tuning_playbook.analysis import study_data


@dataclasses.dataclass(frozen=True)
class Image:
  file: str  # Relative to the page.
  caption: str


@dataclasses.dataclass(frozen=True)
class Link:
  text: str
  href: str


@dataclasses.dataclass(frozen=True)
class Code:
  text: str


@dataclasses.dataclass
class Section:
  """One numbered section: a short explanation, figures, tables and findings."""
  id: str
  title: str
  intro: str
  images: list[Image] = dataclasses.field(default_factory=list)
  tables: list[tuple[list[str], list[list[Any]]]] = dataclasses.field(
      default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)
  findings: list[findings_lib.Finding] = dataclasses.field(default_factory=list)


STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 0 auto; max-width: 1300px; padding: 0 24px 48px; color: #222; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 1px solid #ddd; padding-top: 12px; }
nav a { margin-right: 14px; } .meta { color: #555; }
.finding { border-left: 5px solid #7aa6d6; background: #f3f7fb; padding: 6px 10px;
           margin: 6px 0; }
.finding.warning { border-color: #e07b00; background: #fff5e8; }
.badge { font-weight: bold; text-transform: uppercase; font-size: 11px;
         margin-right: 6px; }
.kind { color: #666; font-size: 12px; margin-left: 6px; }
figure { display: inline-block; margin: 8px 12px 8px 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 12px; color: #555; max-width: 640px; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: left;
         vertical-align: top; }
th { background: #f4f4f4; } code { font-size: 11px; word-break: break-all; }
.note { color: #555; font-style: italic; } .broken { color: #c00; font-weight: bold; }
"""

IMAGE_CHECK = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var failed = images.filter(function (img) {
    return !(img.complete && img.naturalWidth > 0);
  });
  failed.forEach(function (img) {
    var note = document.createElement("div");
    note.className = "broken";
    note.textContent = "Image missing: " + img.getAttribute("src");
    img.parentNode.insertBefore(note, img);
  });
  document.body.setAttribute("data-images-total", String(images.length));
  document.body.setAttribute("data-images-failed",
      failed.map(function (img) { return img.getAttribute("src"); }).join(" "));
  document.body.setAttribute("data-images-status", failed.length ? "failed" : "ok");
});
"""


def _e(text: Any) -> str:
  return html.escape(str(text), quote=True)


def _cell(value: Any) -> str:
  if isinstance(value, Link):
    return f'<a href="{_e(value.href)}">{_e(value.text)}</a>'
  if isinstance(value, Code):
    return f"<code>{_e(value.text)}</code>"
  if isinstance(value, (list, tuple)):
    return " ".join(_cell(v) for v in value)
  return _e(value)


def finding_html(f: findings_lib.Finding) -> str:
  return (f'<div class="finding {_e(f.severity)}" id="finding-{_e(f.id)}">'
          f'<span class="badge">{_e(f.severity)}</span>{_e(f.message)}'
          f'<span class="kind">[{_e(f.kind)}]</span>'
          + (f"<br><code>{_e(f.command)}</code>" if f.command else "")
          + "</div>")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  head = "".join(f"<th>{_e(h)}</th>" for h in header)
  body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>"
                 for row in rows)
  return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _section(s: Section) -> str:
  parts = [f'<section id="{_e(s.id)}"><h2>{_e(s.title)}</h2>',
           f"<p>{_e(s.intro)}</p>" if s.intro else ""]
  parts += [finding_html(f) for f in s.findings]
  parts += [f'<p class="note">{_e(n)}</p>' for n in s.notes]
  parts += [f'<figure><img src="{_e(i.file)}" alt="{_e(i.caption)}">'
            f"<figcaption>{_e(i.caption)}</figcaption></figure>" for i in s.images]
  parts += [_table(h, r) for h, r in s.tables]
  parts.append("</section>")
  return "\n".join(p for p in parts if p)


def render(study: study_data.Study, sections: Sequence[Section],
           found: Sequence[findings_lib.Finding]) -> str:
  """The whole page."""
  counts = {}
  for t in study.trials:
    key = ("feasible" if t.feasible else "infeasible" if t.infeasible
           else "unfinished")
    counts[key] = counts.get(key, 0) + 1
  summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
  best = study.best_trial()
  best_text = (f"best {study.objective.metric} = {best.best_value:.4g} "
               f"(trial {best.trial_id})" if best else "no feasible trial")
  ordered = sorted(found, key=lambda f: f.severity != findings_lib.WARNING)
  warnings = sum(f.severity == findings_lib.WARNING for f in found)
  nav = " ".join(f'<a href="#{_e(s.id)}">{_e(s.title)}</a>' for s in sections)
  return "\n".join([
      "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
      f"<title>Study report: {_e(study.name)}</title>",
      f"<style>{STYLE}</style></head>",
      '<body data-images-status="pending">',
      f"<h1>Study report: {_e(study.name)}</h1>",
      f'<p class="meta">{_e(study.description)}</p>' if study.description else "",
      f'<p class="meta">Config <code>{_e(study.config_path)}</code>, seed '
      f"{_e(study.seed)}; {len(study.trials)} trials ({_e(summary)}); "
      f"objective {_e(study.objective.metric)} ({_e(study.objective.mode)}); "
      f"{_e(best_text)}.</p>",
      (f'<p class="meta">Fixed: {_e(", ".join(f"{k}={v}" for k, v in study.fixed.items()))}'
       "</p>") if study.fixed else "",
      f"<nav>{nav}</nav>",
      f'<section id="findings"><h2>Findings ({warnings} warning'
      f'{"" if warnings == 1 else "s"}, {len(found) - warnings} info)</h2>',
      "".join(finding_html(f) for f in ordered) or "<p>No findings.</p>",
      "<p class=\"meta\">Also in findings.json, beside this page.</p></section>",
      *(_section(s) for s in sections),
      f"<script>{IMAGE_CHECK}</script>",
      "</body></html>", ""])
