#!/usr/bin/env bash
# Serve MedGemma with BentoML — the seed's deploy command, same flags.
#
#   ./deploy_medgemma.sh                                   # google/medgemma-27b-it on 127.0.0.1:3000
#   ./deploy_medgemma.sh --model-path google/medgemma-4b-it --app-name medgemma-4b --port 9202
#   ./deploy_medgemma.sh --demo                            # random-weight demo model, no download, CPU is fine
#   ./deploy_medgemma.sh --host 0.0.0.0                    # reachable from other machines (set MEDGEMMA_API_TOKEN)
#
# It installs what it needs into .venv first (scripts/bootstrap.sh; skip with --no-install), then runs
# `bentoml serve service:MedGemma --host HOST --port PORT`. The default host is loopback: only this machine can
# connect. Every other setting is a MEDGEMMA_* variable (README, "Settings").
set -euo pipefail
cd "$(dirname "$0")"

MODEL="${MEDGEMMA_MODEL:-google/medgemma-27b-it}"
APP_NAME="${MEDGEMMA_APP_NAME:-}"
PORT="${PORT:-3000}"
HOST=127.0.0.1  # not read from the environment: zsh and some CI systems set HOST to the machine's name
INSTALL=1

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --model-path) MODEL="$2"; shift 2 ;;
    --app-name) APP_NAME="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --host) HOST="$2"; shift 2 ;;
    --demo) MODEL="${DEMO_MODEL:-demo}"; shift ;;
    --no-install) INSTALL=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
  esac
done

if [ "$INSTALL" = 1 ]; then
  EXTRAS="" bash scripts/bootstrap.sh
fi
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"

export MEDGEMMA_MODEL="$MODEL" MEDGEMMA_APP_NAME="$APP_NAME" BENTOML_DO_NOT_TRACK="${BENTOML_DO_NOT_TRACK:-true}"
APP_SHOWN=$(python -c "from medgemma.config import Settings; print(Settings.from_env().route_prefix)")
case "$HOST" in
  0.0.0.0|::|'[::]')
    URL_HOST=$(hostname -f 2>/dev/null || hostname)
    echo "listening on all interfaces ($HOST, port $PORT): other machines can connect" ;;
  *:*) URL_HOST="[$HOST]"; echo "listening on $HOST, port $PORT" ;;
  *) URL_HOST="$HOST"; echo "listening on $HOST, port $PORT" ;;
esac
echo "serving $MODEL at http://$URL_HOST:$PORT/$APP_SHOWN/v1/ (OpenAI API at http://$URL_HOST:$PORT/v1)"
exec bentoml serve service:MedGemma --host "$HOST" --port "$PORT"
