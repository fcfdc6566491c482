"""The playbook's second half on the default workload, with the real trainer.

A finished quasi-random study of configs/mnist1d_cnn.py (4 trials of 60 steps
as one population) is the start of `exploit`, `compare` and
`batch_size_time`; each report's procedure section is opened in headless
Chromium, its figure decoded, and screenshotted.
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image
import pytest

from tests import helpers
from tests import test_analysis_report as browser_checks

CNN = "configs/mnist1d_cnn.py"
SHORT = ("--config.max_train_steps=60", "--config.eval_every_steps=20",
         "--config.log_every_steps=20")


def _run(module, *args):
  result = subprocess.run(
      [sys.executable, "-m", module, *args], cwd=helpers.REPO,
      env=helpers.subprocess_env(fast_compile=True), capture_output=True,
      text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _playbook(name, study_dir, source, *args, short=SHORT):
  _run("tuning_playbook.playbook", name, f"--config={CNN}",
       f"--study_dir={study_dir}", f"--from_study={source}", *short, *args,
       "--run", "--vectorize=4")


def _findings(study_dir):
  _run("tuning_playbook.analyze", f"--study_dir={study_dir}")
  with open(os.path.join(study_dir, "report", "findings.json")) as f:
    return {f["id"]: f for f in json.load(f)["findings"]}


def _statuses(study_dir):
  with open(os.path.join(study_dir, "results.csv")) as f:
    return [line.split(",")[1] for line in f.read().splitlines()[1:]]


def _section_in_chromium(study_dir, section, tmp_path):
  """Opens the report at `#section`: every image decodes; a screenshot of
  the section is not blank."""
  browser = browser_checks.find_chromium()
  profile = tempfile.mkdtemp(dir=tmp_path)
  url = "file://" + os.path.join(study_dir, "report", "index.html")
  dom = browser_checks.chromium(browser, "--virtual-time-budget=10000",
                                "--dump-dom", url, user_data_dir=profile)
  assert dom.returncode == 0, dom.stderr[-2000:]
  assert browser_checks.body_attributes(dom.stdout)["data-images-status"] == "ok"
  assert f'id="{section}"' in dom.stdout
  start = dom.stdout.index(f'<section id="{section}">')
  shown = dom.stdout[start:dom.stdout.index("</section>", start)]
  with open(os.path.join(study_dir, "report", "findings.json")) as f:
    for finding in json.load(f)["findings"]:  # Each at most once in it.
      assert shown.count(f'id="finding-{finding["id"]}"') <= 1, finding["id"]
  assert f'id="finding-{section}/' in shown
  assert f"procedure_{section}.png" in dom.stdout
  # The section alone, as the report styles it, beside the report's images.
  with open(os.path.join(study_dir, "report", "index.html")) as f:
    page = f.read()
  start = page.index(f'<section id="{section}">')
  alone = (page[:page.index("<body")] + "<body>"
           + page[start:page.index("</section>", start)] + "</section></body></html>")
  alone_path = os.path.join(study_dir, "report", f"section_{section}.html")
  with open(alone_path, "w") as f:
    f.write(alone)
  shot = str(tmp_path / f"{section}.png")
  run = browser_checks.chromium(browser, "--virtual-time-budget=10000",
                                f"--screenshot={shot}", "--window-size=1300,900",
                                "file://" + alone_path, user_data_dir=profile)
  assert run.returncode == 0, run.stderr[-2000:]
  with Image.open(shot) as img:
    pixels = np.asarray(img.convert("RGB"))
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # A plot, text.
  return shot


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  study_dir = str(tmp_path_factory.mktemp("default") / "study")
  _run("tuning_playbook.sweep", f"--config={CNN}", f"--study_dir={study_dir}",
       "--num_trials=4", "--seed=0", *SHORT, "--run", "--vectorize=4")
  assert "completed" in _statuses(study_dir)
  return study_dir


def test_exploit_from_a_finished_study(source, tmp_path):
  study_dir = str(tmp_path / "exploit")
  _playbook("exploit", study_dir, source, "--num_trials=2", "--batch=2")
  assert len(_statuses(study_dir)) == 2
  with open(os.path.join(study_dir, "study.json")) as f:
    record = json.load(f)
  assert record["sampler"] == {"algorithm": "vizier", "designer": "gp_ucb_pe"}
  params = [t["params"] for t in record["trials"]]
  assert params[0] != params[1]  # A batch, not one point twice.
  # Relaunched when finished: nothing new is proposed or trained.
  _playbook("exploit", study_dir, source, "--num_trials=2", "--batch=2")
  with open(os.path.join(study_dir, "study.json")) as f:
    assert json.load(f)["trials"] == record["trials"]
  result = _findings(study_dir)["exploit/result"]["details"]
  assert result["test_metric"] == "eval/test/error_rate"
  best = os.path.join(study_dir, "trials", result["best_trial"])
  rows = helpers.read_jsonl(os.path.join(best, "metrics.jsonl"))
  (at_best,) = [r for r in rows if r["step"] == result["best_step"]
                and "eval/test/error_rate" in r]
  assert result["test_value"] == at_best["eval/test/error_rate"]
  _section_in_chromium(study_dir, "exploit", tmp_path)


def test_compare_from_a_finished_study(source, tmp_path):
  study_dir = str(tmp_path / "compare")
  _playbook("compare", study_dir, source, "--candidate=model.dropout_rate=0.3",
            "--num_seeds=2")
  assert _statuses(study_dir) == ["completed"] * 4
  decision = _findings(study_dir)["compare/decision"]["details"]
  assert decision["decision"] in ("adopt", "worse", "noise")
  assert len(decision["values"]["baseline"]) == len(decision["values"]["candidate"]) == 2
  _section_in_chromium(study_dir, "compare", tmp_path)


def test_batch_size_time_from_a_finished_study(source, tmp_path):
  study_dir = str(tmp_path / "batch_time")
  _playbook("batch_size_time", study_dir, source, "--batch_sizes=32,64",
            "--lr_factors=1", "--eval_every=10",
            short=[a for a in SHORT if "eval_every" not in a])
  assert _statuses(study_dir) == ["completed"] * 2
  result = _findings(study_dir)["batch_size_time/time_to_result"]["details"]
  rows = {r["batch_size"]: r for r in result["rows"]}
  assert set(rows) == {32, 64}
  reached = [r for r in rows.values() if r["steps"]]
  assert reached  # The target is the worse batch size's best: one reaches it.
  for r in reached:
    assert r["training_seconds"] == pytest.approx(r["steps"] * r["seconds_per_step"])
  _section_in_chromium(study_dir, "batch_size_time", tmp_path)
