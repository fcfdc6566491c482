#!/usr/bin/env bash
# Installs the headless Chromium that tests/test_analysis_report.py opens the
# study report in, with the system's package manager (Debian's `chromium`).
# Does nothing when a Chromium is already on PATH; the test looks for the same
# names.
set -euo pipefail

for name in chromium chromium-browser google-chrome google-chrome-stable; do
  if path="$(command -v "${name}")"; then
    echo "Chromium already installed: ${path}"
    exit 0
  fi
done

if ! command -v apt-get >/dev/null; then
  echo "No Chromium on PATH and no apt-get: install Chromium (or Chrome) with" \
    "the system's package manager." >&2
  exit 1
fi

sudo=""
if [[ "$(id -u)" != "0" ]]; then
  if ! command -v sudo >/dev/null; then
    echo "Installing Chromium needs root: rerun as root or install sudo." >&2
    exit 1
  fi
  sudo="sudo"
fi

# fonts-dejavu-core: the report's text needs a font to render in screenshots.
${sudo} env DEBIAN_FRONTEND=noninteractive apt-get update -q
${sudo} env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
  --no-install-recommends chromium fonts-dejavu-core
chromium --version
