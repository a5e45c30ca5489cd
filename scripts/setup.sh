#!/usr/bin/env bash
# Create .venv and install the toolkit with everything the demo and the tests need (CPU host).
# torch is pinned to the CPU build first so no multi-GB CUDA wheel is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.setup-stamp
want=$(cat setup.cfg scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[triton,onnx,dev]'
  echo "$want" > "$stamp"
fi
