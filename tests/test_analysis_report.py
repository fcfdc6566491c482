"""The study report end to end: the CLI, the page in headless Chromium, a
sweep with one study per scientific value, and a real small study."""

import html.parser
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image
import pytest

from tests import analysis_fixtures as fx
from tests import helpers
from tuning_playbook.analysis import report
from tuning_playbook.analysis import study_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The names tests/install_browser.sh checks for before installing Debian's.
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
SECTIONS = {"findings": "Findings", "axis": "1. Basic hyperparameter axis plots",
            "isolation": "2. Isolation plots", "curves": "3. Training curves",
            "gradients": "4. Gradient norms", "search_space": "5. Search-space checks",
            "sampling": "6. Have we sampled enough?", "leaderboard": "7. Leaderboard"}
FINDING_KEYS = {"id", "kind", "severity", "message", "details"}


def env(**extra):
  path = os.pathsep.join(filter(None, [os.path.join(REPO, "tests"), REPO,
                                       os.environ.get("PYTHONPATH")]))
  return dict(os.environ, PYTHONPATH=path, TF_CPP_MIN_LOG_LEVEL="2",
              XLA_FLAGS=helpers.xla_flags(1), **extra)


def analyze_cli(study_dir, timeout=300):
  return subprocess.run(
      [sys.executable, "-m", "tuning_playbook.analyze", f"--study_dir={study_dir}"],
      cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


class _Page(html.parser.HTMLParser):
  """Collects image sources, link targets, section ids and external references."""

  def __init__(self):
    super().__init__()
    self.images, self.links, self.sections, self.external = [], [], [], []

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    for key in ("src", "href"):
      value = attrs.get(key) or ""
      if "://" in value or value.startswith("//"):
        self.external.append(value)
    if tag == "img":
      self.images.append(attrs["src"])
    elif tag == "a" and not attrs.get("href", "").startswith("#"):
      self.links.append(attrs["href"])
    elif tag == "section":
      self.sections.append(attrs["id"])
    elif tag in ("link", "iframe") or (tag == "script" and "src" in attrs):
      self.external.append(f"<{tag}>")


def parse_page(path):
  page = _Page()
  with open(path) as f:
    text = f.read()
  page.feed(text)
  return page, text


def check_report(report_dir, study):
  """Asserts what every report must hold; returns the page and findings."""
  page, text = parse_page(os.path.join(report_dir, "index.html"))
  assert page.sections == list(SECTIONS)
  for title in SECTIONS.values():
    assert title in text
  assert page.external == []
  assert page.images and len(set(page.images)) == len(page.images)
  for src in page.images:
    assert os.path.dirname(src) == "" and src.endswith(".png")
    with Image.open(os.path.join(report_dir, src)) as img:
      assert img.size[0] > 300 and img.size[1] > 150
  assert sorted(f for f in os.listdir(report_dir) if f.endswith(".png")) == sorted(
      page.images)
  for href in page.links:
    assert not os.path.isabs(href)
    assert os.path.exists(os.path.join(report_dir, href)), href
  with open(os.path.join(report_dir, "findings.json")) as f:
    payload = json.load(f)
  assert payload["num_trials"] == len(study.trials)
  ids = [f["id"] for f in payload["findings"]]
  assert len(ids) == len(set(ids))
  for finding in payload["findings"]:
    assert set(finding) - {"command"} == FINDING_KEYS
    assert finding.get("command", "python -m ").startswith("python -m ")
    assert finding["severity"] in ("info", "warning") and finding["message"]
  return page, text, payload


def test_cli_writes_the_report(tmp_path):
  specs = fx.clean_specs()
  specs[0].lr_position = 0.97
  specs.append(fx.TrialSpec(0.5, 0.5, "relu", 0.3, shape="no_start"))
  study_dir = fx.write_study(str(tmp_path / "study"), specs, "cli")
  result = analyze_cli(study_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "[warning] The best trial (0000) has optimizer.learning_rate" in result.stdout
  study = study_data.load_study(study_dir)
  page, text, payload = check_report(os.path.join(study_dir, "report"), study)
  kinds = {f["kind"] for f in payload["findings"]}
  assert {"near_boundary", "unfinished", "infeasible", "clipping_threshold",
          "best_step_fraction", "sampling"} <= kinds
  # One axis plot per varied hyperparameter, an isolation plot for the
  # scientific one, and gradient norms of the best trials.
  for name in ("optimizer.learning_rate", "optimizer.momentum", "model.activation"):
    assert f"axis_{name}.png" in page.images
  assert "isolation_model.activation.png" in page.images
  assert {"curves_all.png", "coverage.png", "best_step.png", "bootstrap.png"} <= set(
      page.images)
  assert "grad_0000.png" in page.images
  # The leaderboard links every trial's records and its reproduce command.
  assert "../trials/0000/metrics.jsonl" in page.links
  assert "../trials/0010/log.txt" in page.links
  lr = study.trials[0].params["optimizer.learning_rate"]
  assert (f"--workdir={study_dir}/trials/0000 "
          f"--config.optimizer.learning_rate={lr!r}") in text


def test_cli_refuses_a_directory_without_a_study(tmp_path):
  result = analyze_cli(str(tmp_path))
  assert result.returncode == 2
  assert "no study.json" in result.stderr


def find_chromium() -> str:
  """The first Chromium on PATH; fails, naming the installer, if there is none."""
  for name in BROWSERS:
    path = shutil.which(name)
    if path:
      return path
  pytest.fail(f"no Chromium on PATH (looked for {', '.join(BROWSERS)}): "
              "run `bash tests/install_browser.sh`")


def chromium(browser, *args, user_data_dir, timeout=120):
  return subprocess.run(
      [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
       "--no-first-run", "--disable-background-networking",
       "--disable-component-update", "--disable-sync",
       f"--user-data-dir={user_data_dir}", *args],
      capture_output=True, text=True, timeout=timeout)


def body_attributes(dom):
  start = dom.index("<body")
  parser = _BodyAttrs()
  parser.feed(dom[start:dom.index(">", start) + 1])
  return parser.attrs


class _BodyAttrs(html.parser.HTMLParser):

  def handle_starttag(self, tag, attrs):
    self.attrs = dict(attrs)


@pytest.mark.slow
def test_report_in_headless_chromium(tmp_path):
  browser = find_chromium()
  study_dir = fx.clean_study(str(tmp_path / "study"))
  result = report.write_report(study_data.load_study(study_dir))
  url = "file://" + os.path.abspath(result.index_html)
  profile = tempfile.mkdtemp(dir=tmp_path)

  dom = chromium(browser, "--virtual-time-budget=10000", "--dump-dom", url,
                 user_data_dir=profile)
  assert dom.returncode == 0, dom.stderr[-2000:]
  attrs = body_attributes(dom.stdout)
  assert attrs["data-images-status"] == "ok", attrs
  assert int(attrs["data-images-total"]) == len(result.images) >= 12

  shot = str(tmp_path / "screenshot.png")
  run = chromium(browser, f"--screenshot={shot}", "--window-size=1400,3000", url,
                 user_data_dir=profile)
  assert run.returncode == 0, run.stderr[-2000:]
  with Image.open(shot) as img:
    assert img.size == (1400, 3000)
    pixels = np.asarray(img.convert("RGB"))
  colours = np.unique(pixels.reshape(-1, 3), axis=0)
  assert len(colours) > 100  # Text, plots and finding boxes, not a blank page.
  # The top of the page shows the title and the findings (dark text on white).
  assert (pixels[:400] < 100).all(axis=-1).mean() > 0.005

  # The check sees a missing image.
  os.remove(os.path.join(result.report_dir, "coverage.png"))
  dom = chromium(browser, "--virtual-time-budget=10000", "--dump-dom", url,
                 user_data_dir=profile)
  attrs = body_attributes(dom.stdout)
  assert attrs["data-images-status"] == "failed"
  assert attrs["data-images-failed"] == "coverage.png"
  assert "Image missing: coverage.png" in dom.stdout


def sweep(study_dir, config, *args, trainer=None, timeout=600, **env_extra):
  argv = [sys.executable, "-m", "tuning_playbook.sweep", f"--config={config}",
          f"--study_dir={study_dir}", "--seed=0", "--run", *args]
  if trainer:
    argv.append(f"--trainer_module={trainer}")
  result = subprocess.run(argv, cwd=REPO, env=env(**env_extra), capture_output=True,
                          text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]


def test_one_study_per_scientific_value(tmp_path):
  study_dir = str(tmp_path / "optimizers")
  sweep(study_dir, "tests/configs/optimizer_study.py", "--num_trials=5",
        "--parallel=2", trainer="fake_trainer", FAKE_TRAINER_DIVERGE_ABOVE="0.5")
  assert not os.path.exists(os.path.join(study_dir, "study.json"))
  result = analyze_cli(study_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  study = study_data.load_study(study_dir)
  dims = study.dimensions
  assert dims["optimizer.name"].role == "scientific"
  assert set(dims["optimizer.name"].values) == {"nesterov", "adam"}
  # The learning rate has a range per optimizer: one dimension each.
  assert {"optimizer.learning_rate[optimizer.name=adam]",
          "optimizer.learning_rate[optimizer.name=nesterov]",
          "optimizer.weight_decay"} <= set(dims)
  assert len(study.trials) == 10
  page, text, payload = check_report(os.path.join(study_dir, "report"), study)
  assert "isolation_optimizer.name.png" in page.images
  assert "../optimizer.name=adam/trials/0000/summary.json" in page.links
  assert "--config.optimizer.name=adam" in text  # From results.csv.
  statuses = {t.trial_id: t.status for t in study.trials}
  diverged = [i for i, s in statuses.items() if s == "diverged"]
  assert diverged and all(i.startswith("optimizer.name=nesterov/") for i in diverged)


@pytest.mark.slow
def test_real_small_study(tmp_path):
  study_dir = str(tmp_path / "tiny")
  sweep(study_dir, "tests/configs/tiny_study.py", "--num_trials=3", "--vectorize=3",
        "--config.max_train_steps=30", "--config.eval_every_steps=5")
  result = analyze_cli(study_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  study = study_data.load_study(study_dir)
  assert [t.status for t in study.trials] == ["completed"] * 3
  page, text, payload = check_report(os.path.join(study_dir, "report"), study)
  assert len(page.images) >= 3 + 1 + 2 + 1 + 2 + 1  # Every section has figures.
  kinds = {f["kind"]: f for f in payload["findings"]}
  suggestion = kinds["clipping_threshold"]["details"]
  best = study.best_trial()
  with open(os.path.join(best.run_dir, "grad_norms.jsonl")) as f:
    norms = [json.loads(line)["train/grad_norm"] for line in f]
  assert len(norms) == best.total_train_steps == 30 + best.config[
      "optimizer"]["warmup_steps"]  # The warmup is prepended.
  assert suggestion["suggested_threshold"] == pytest.approx(np.percentile(norms, 90))
  fractions = kinds["best_step_fraction"]["details"]["fractions"]
  assert fractions == {t.trial_id: t.best_step / t.total_train_steps
                       for t in study.feasible_trials()}
  assert "curves_missing" not in kinds  # Six evaluations per trial.
  assert any(k in kinds for k in ("curves_ok", "overfitting", "still_improving",
                                  "saturated", "late_variance"))
