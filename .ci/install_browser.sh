#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium for the report's browser test.
# Idempotent: does nothing when /usr/bin/chromium is already there.
set -euo pipefail

if [[ -x /usr/bin/chromium ]]; then
  echo "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo unknown version)"
  exit 0
fi

SUDO=""
if [[ "$(id -u)" != "0" ]]; then
  SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
${SUDO} apt-get update -q
${SUDO} apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
/usr/bin/chromium --version
