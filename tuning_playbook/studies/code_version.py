"""The code that produced a study: its config's git commit and the framework.

The playbook asks each study's record to say what code produced it. The
tracking table's `code_version` column holds, for the checkout that holds the
study's config file, its commit (12 hex digits, `-dirty` when tracked files
differ from it), and the framework's version:

  code_version.describe("configs/mnist1d_cnn.py")
  # -> "3de65e5a1b2c-dirty (tuning_playbook 0.1.0)"; outside a git
  #    checkout: "tuning_playbook 0.1.0".
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess

_GIT_SECONDS = 10.0


def _git(directory: str, *args: str) -> str:
  return subprocess.run(["git", "-C", directory, *args], capture_output=True,
                        text=True, check=True, timeout=_GIT_SECONDS).stdout.strip()


def framework_version() -> str:
  try:
    return f"tuning_playbook {importlib.metadata.version('tuning_playbook')}"
  except importlib.metadata.PackageNotFoundError:
    return "tuning_playbook (not installed)"


def describe(path: str) -> str:
  """The commit of the git checkout holding `path` (a file or directory),
  with `-dirty` for uncommitted changes to tracked files, and the
  framework's version."""
  directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  try:
    commit = _git(directory, "rev-parse", "HEAD")
    dirty = _git(directory, "status", "--porcelain", "--untracked-files=no")
  except (OSError, subprocess.SubprocessError):
    return framework_version()
  return f"{commit[:12]}{'-dirty' if dirty else ''} ({framework_version()})"
