#!/usr/bin/env bash
# The test command: installs what the tests need (venv, packages, headless Chromium where possible), then runs pytest.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not browser"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# The playground test drives Debian's Chromium (nothing can download a browser here). Install it when we can.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "warning: could not install chromium; browser tests will fail under CI" >&2
fi
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
export BENTOML_DO_NOT_TRACK=true HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check . && ruff format --check .
exec python -m pytest "$@"
