"""The code version a study's tracking row records (studies/code_version.py)."""

import os
import subprocess

from tuning_playbook.studies import code_version


def _git(directory, *args):
  return subprocess.run(["git", "-C", str(directory), *args], check=True,
                        capture_output=True, text=True).stdout.strip()


def test_a_config_in_a_checkout_names_its_commit_and_uncommitted_changes(tmp_path):
  repo = tmp_path / "project"
  (repo / "configs").mkdir(parents=True)
  config = repo / "configs" / "mine.py"
  config.write_text("def get_config():\n  return None\n")
  _git(repo, "init", "-q")
  _git(repo, "add", ".")
  _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
  commit = _git(repo, "rev-parse", "HEAD")
  framework = code_version.framework_version()
  assert framework.startswith("tuning_playbook ")
  assert code_version.describe(str(config)) == f"{commit[:12]} ({framework})"
  (repo / "notes.txt").write_text("untracked files leave it clean\n")
  assert code_version.describe(str(config)) == f"{commit[:12]} ({framework})"
  config.write_text("def get_config():\n  return 1\n")
  assert code_version.describe(str(config)) == f"{commit[:12]}-dirty ({framework})"
  assert code_version.describe(str(repo)) == f"{commit[:12]}-dirty ({framework})"


def test_outside_a_checkout_only_the_framework_version(tmp_path):
  config = tmp_path / "mine.py"
  config.write_text("")
  assert code_version.describe(str(config)) == code_version.framework_version()
  assert code_version.describe(str(tmp_path / "missing" / "x.py")) == (
      code_version.framework_version())
