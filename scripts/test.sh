#!/usr/bin/env bash
# Install the package, Debian's Chromium (browser test) and a throwaway PostgreSQL on loopback (their tests
# skip if either cannot be had), then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/browser.sh || echo "[test] Chromium could not be installed: the real-browser test will skip"
if pg_env=$(bash scripts/postgres.sh); then
  eval "$pg_env"
  trap 'bash scripts/postgres.sh stop' EXIT
else
  echo "[test] no PostgreSQL server could be started: the PostgreSQL store tests will skip"
fi
.venv/bin/python -m pytest "$@"
