"""The tuning log: `analyze --tracking_table` draws a chain of studies.

Three linked studies on tests/fake_trainer.py: a sweep, `next_round` from it
and `compare` from that; the page is checked as HTML and in headless
Chromium.
"""

import html.parser
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

from tests import test_analysis_report as browser_checks

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TINY = "tests/configs/tiny_study.py"


def _run(module, *args, expect=0):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=os.pathsep.join(
      filter(None, [HERE, os.environ.get("PYTHONPATH")])))
  result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == expect, result.stderr[-3000:]
  return result


class _Tree(html.parser.HTMLParser):
  """Each study's id -> the ids of the studies it lies inside."""

  def __init__(self):
    super().__init__()
    self.stack, self.parents = [], {}

  def handle_starttag(self, tag, attrs):
    if tag == "li":
      own = dict(attrs).get("id", "")
      self.parents[own] = [s for s in self.stack if s]
      self.stack.append(own)

  def handle_endtag(self, tag):
    if tag == "li":
      self.stack.pop()


def test_three_linked_studies_render_as_a_chain(tmp_path):
  runs = tmp_path / "runs"
  first, second, third = (str(runs / n) for n in ("sweep", "longer", "compare"))
  fake = "--trainer_module=fake_trainer"
  _run("tuning_playbook.sweep", f"--config={TINY}", f"--study_dir={first}",
       "--num_trials=4", "--seed=0", fake, "--run")
  _run("tuning_playbook.playbook", "next_round", f"--config={TINY}",
       f"--study_dir={second}", f"--from_study={first}", "--steps_factor=2",
       fake, "--run")
  _run("tuning_playbook.playbook", "compare", f"--config={TINY}",
       f"--study_dir={third}", f"--from_study={second}",
       "--candidate=optimizer.momentum=0.95", "--num_seeds=2", fake, "--run")
  table = str(runs / "studies.csv")
  out = _run("tuning_playbook.analyze", f"--tracking_table={table}").stdout
  page_path = str(runs / "tuning_log.html")
  assert f"Tuning log: {page_path}" in out
  with open(page_path) as f:
    page = f.read()
  tree = _Tree()
  tree.feed(page)
  assert tree.parents == {"study-tiny": [],
                          "study-tiny_study/next_round": ["study-tiny"],
                          "study-tiny_study/compare": [
                              "study-tiny", "study-tiny_study/next_round"]}
  # What each found, the command that ran it, its report and code version.
  assert 'id="finding-next_round/longer"' in page
  assert 'id="finding-compare/decision"' in page
  for study_dir in (first, second, third):
    assert f'href="{os.path.relpath(study_dir, runs)}/report/index.html"' in page
    assert os.path.exists(os.path.join(study_dir, "report", "index.html"))
  assert "python -m tuning_playbook.playbook compare --config=" in page
  assert page.count("<code>unknown</code>") == 0

  browser = browser_checks.find_chromium()
  profile = tempfile.mkdtemp(dir=tmp_path)
  url = "file://" + page_path
  dom = browser_checks.chromium(browser, "--dump-dom", url, user_data_dir=profile)
  assert dom.returncode == 0, dom.stderr[-2000:]
  assert dom.stdout.count('class="study"') == 3
  shot = str(tmp_path / "log.png")
  run = browser_checks.chromium(browser, f"--screenshot={shot}",
                                "--window-size=1200,1400", url, user_data_dir=profile)
  assert run.returncode == 0, run.stderr[-2000:]
  with Image.open(shot) as img:
    pixels = np.asarray(img.convert("RGB"))
  # Text and finding boxes in the top part, not a blank page.
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20
  assert (pixels[:600] < 100).all(axis=-1).mean() > 0.005


def test_a_missing_table_is_refused(tmp_path):
  result = _run("tuning_playbook.analyze",
                f"--tracking_table={tmp_path}/nope.csv", expect=2)
  assert f"--tracking_table={tmp_path}/nope.csv: no such file" in result.stderr
