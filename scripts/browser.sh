#!/usr/bin/env bash
# Install Debian's chromium package for the dashboard's real-browser test (tests/ui/test_browser.py drives it
# with Playwright through executable_path; no browser download). Idempotent: does nothing when
# /usr/bin/chromium exists. Needs root (or passwordless sudo) for apt-get.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  echo "[browser] /usr/bin/chromium is installed"
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  as_root=(sudo -n)
else
  echo "[browser] /usr/bin/chromium is missing and this user cannot run apt-get as root: the browser test will skip" >&2
  exit 0
fi
echo "[browser] installing Debian's chromium package"
"${as_root[@]}" apt-get update -q
DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -q chromium
/usr/bin/chromium --version
