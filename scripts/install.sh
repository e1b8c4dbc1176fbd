#!/usr/bin/env bash
# Install megalign (editable, with test extras) into a virtual environment: .venv unless MEGALIGN_VENV is set.
# torch: kept if the environment has one; otherwise $TORCH_SPEC (default torch==2.13.0, a CPU build where
# the machine provides one; on a GPU cluster install your CUDA build of torch first).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${MEGALIGN_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  "$venv/bin/pip" install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
"$venv/bin/pip" install -q -e ".[test]"
echo "$venv"
