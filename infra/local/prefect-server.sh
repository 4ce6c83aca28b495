#!/usr/bin/env bash
# Start the Prefect server (API + UI) on 127.0.0.1:PORT, with the UI pointed at that same API.
#   bash infra/local/prefect-server.sh PORT
# up.sh starts the platform's server with this script. The UI asks the server for its API
# address (GET /ui-settings, `api_url`), which Prefect derives from PREFECT_UI_API_URL, else
# from PREFECT_API_URL, else from port 4200: a server on any other port must set it, or the
# browser UI shows "Can't connect to Server API" and empty pages while the API itself works.
# The process execs into `prefect server start`, so its PID is the server's.
set -euo pipefail

PORT=${1:?usage: prefect-server.sh PORT}
HOST=127.0.0.1 # never 0.0.0.0: the server has no authentication
BIN=${CLIPSHIFT_VENV_BIN:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/.venv/bin}

export PREFECT_UI_API_URL=${CLIPSHIFT_PREFECT_UI_API_URL:-http://$HOST:$PORT/api}
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
exec "$BIN/prefect" server start --host "$HOST" --port "$PORT" --analytics-off
