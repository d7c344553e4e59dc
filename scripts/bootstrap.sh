#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install everything into it. Idempotent.
#   VENV=.venv            where the environment lives
#   TORCH_SPEC=...        how to install torch when it is missing (default: torch==2.13.0; on a GPU host you may
#                         prefer e.g. "torch --index-url https://download.pytorch.org/whl/cu126")
#   EXTRAS=test           pyproject extras to install (empty for serving only)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip >/dev/null
# torch first and on its own: a plain range would let pip pick the newest (CUDA, several GB) build.
if ! python -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086
  python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
fi
EXTRAS=${EXTRAS-test}
python -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
python -c "import torch, transformers, bentoml; print(f'ready: torch {torch.__version__}, transformers {transformers.__version__}, bentoml {bentoml.__version__}')"
