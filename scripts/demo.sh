#!/usr/bin/env bash
# Install, then run the whole loop on freshly generated synthetic data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/adisc demo "$@"
