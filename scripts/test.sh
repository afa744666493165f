#!/usr/bin/env bash
# Install, start a throwaway PostgreSQL on loopback (its tests skip if that fails), then run the whole
# test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if pg_env=$(bash scripts/postgres.sh); then
  eval "$pg_env"
  trap 'bash scripts/postgres.sh stop' EXIT
else
  echo "[test] no PostgreSQL server could be started: the PostgreSQL store tests will skip"
fi
.venv/bin/python -m pytest "$@"
