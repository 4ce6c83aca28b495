#!/usr/bin/env bash
# Start the clipshift platform on this machine, without Docker, on 127.0.0.1 only:
#   s3       an S3-compatible store (moto_server, in memory; S3_BACKEND=s3rver persists to disk)
#   mlflow   MLflow tracking server (SQLite runs, artifacts proxied to s3://$CLIPSHIFT_BUCKET)
#   prefect  Prefect server (SQLite) with its UI
#   worker   a Prefect process worker polling the work pool $CLIPSHIFT_WORK_POOL
# then write the endpoints file that points clients at them (`. infra/local/endpoints.env`).
#
# Idempotent: a service whose PID file names a live process that answers its health check is
# left alone. Stop everything with infra/local/down.sh (data in the state dir is kept).
# Settings (environment): CLIPSHIFT_PLATFORM_DIR (state dir, default infra/local/state),
# CLIPSHIFT_S3_PORT (19000), CLIPSHIFT_MLFLOW_PORT (15000), CLIPSHIFT_PREFECT_PORT (14200),
# S3_BACKEND (moto|s3rver), CLIPSHIFT_BUCKET (clipshift), CLIPSHIFT_DATA_BUCKET
# (clipshift-data), CLIPSHIFT_WORK_POOL (clipshift-local), CLIPSHIFT_WORKDIR (where flow runs
# execute, default the repository), CLIPSHIFT_WORKER_LIMIT (concurrent flow runs, default
# unlimited), CLIPSHIFT_START_TIMEOUT (seconds per service, default 120),
# CLIPSHIFT_ENDPOINTS_FILE (default infra/local/endpoints.env, or <state>/endpoints.env when
# CLIPSHIFT_PLATFORM_DIR is set).
# CLIPSHIFT_PREFECT_UI_API_URL (the API address the Prefect UI calls, default
# http://127.0.0.1:<prefect port>/api; set it when the UI is reached through a proxy or tunnel).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
STATE=${CLIPSHIFT_PLATFORM_DIR:-$HERE/state}
if [ -n "${CLIPSHIFT_PLATFORM_DIR:-}" ]; then
  ENDPOINTS=${CLIPSHIFT_ENDPOINTS_FILE:-$STATE/endpoints.env}
else
  ENDPOINTS=${CLIPSHIFT_ENDPOINTS_FILE:-$HERE/endpoints.env}
fi
BIN=${CLIPSHIFT_VENV_BIN:-$REPO/.venv/bin}
PY=$BIN/python
HOST=127.0.0.1 # never 0.0.0.0: these servers have no authentication
S3_BACKEND=${S3_BACKEND:-moto}
BUCKET=${CLIPSHIFT_BUCKET:-clipshift}
DATA_BUCKET=${CLIPSHIFT_DATA_BUCKET:-clipshift-data}
POOL=${CLIPSHIFT_WORK_POOL:-clipshift-local}
WORKDIR=${CLIPSHIFT_WORKDIR:-$REPO}
TIMEOUT=${CLIPSHIFT_START_TIMEOUT:-120}
RUN=$STATE/run
LOGS=$STATE/logs

die() { echo "up.sh: error: $*" >&2; exit 1; }
say() { echo "up.sh: $*"; }

[ -x "$PY" ] || die "no Python at $PY; run 'bash infra/setup.sh' first (or set CLIPSHIFT_VENV_BIN)"
case "$S3_BACKEND" in moto|s3rver) ;; *) die "S3_BACKEND='$S3_BACKEND'; use moto or s3rver" ;; esac
mkdir -p "$RUN" "$LOGS" "$STATE/prefect"

# ---------------------------------------------------------------------------------------------
# process bookkeeping: <run>/<svc>.pid holds "PID STARTTIME" (start time in clock ticks since
# boot, from /proc) so a recycled PID is never mistaken for ours; <run>/<svc>.port its port.

start_ticks() { awk '{print $22}' "/proc/$1/stat" 2>/dev/null || true; }

# Prints the PID of svc if its PID file names a live process started when recorded.
live_pid() {
  local file=$RUN/$1.pid pid ticks
  [ -f "$file" ] || return 1
  read -r pid ticks <"$file" || return 1
  [ -n "$pid" ] && [ "$(start_ticks "$pid")" = "$ticks" ] || return 1
  echo "$pid"
}

port_for() { # the recorded port of a running svc, else the configured one
  local svc=$1 default=$2
  if live_pid "$svc" >/dev/null && [ -f "$RUN/$svc.port" ]; then cat "$RUN/$svc.port"; else echo "$default"; fi
}

port_busy() {
  "$PY" - "$1" <<'PY'
import socket, sys
with socket.socket() as s:
    s.settimeout(0.5)
    sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)
PY
}

# Start "$@" as svc in its own session (so down.sh can signal its whole process group).
launch() {
  local svc=$1 port=$2; shift 2
  if port_busy "$port"; then
    die "port $port (for $svc) is taken by another program; free it or set the port variable (see the header of $0)"
  fi
  echo "=== $(date -Is) starting: $*" >>"$LOGS/$svc.log"
  setsid "$@" >>"$LOGS/$svc.log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid $(start_ticks "$pid")" >"$RUN/$svc.pid"
  echo "$port" >"$RUN/$svc.port"
  date +%s.%N >"$RUN/$svc.started"
}

# Wait until `check` succeeds; fail with the log's tail if the process dies or time runs out.
wait_healthy() {
  local svc=$1; shift
  local deadline=$(( $(date +%s) + TIMEOUT ))
  until "$@" >/dev/null 2>&1; do
    if ! live_pid "$svc" >/dev/null; then
      tail -n 20 "$LOGS/$svc.log" >&2 || true
      die "$svc exited during start-up; see $LOGS/$svc.log"
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      tail -n 20 "$LOGS/$svc.log" >&2 || true
      die "$svc not healthy after ${TIMEOUT}s; see $LOGS/$svc.log (or raise CLIPSHIFT_START_TIMEOUT)"
    fi
    sleep 0.5
  done
  if [ -f "$RUN/$svc.started" ]; then
    local t0; t0=$(cat "$RUN/$svc.started"); rm -f "$RUN/$svc.started"
    say "$svc healthy after $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s"
  fi
}

# Start svc unless its PID file names a live process (no twins); a live one that is not healthy
# yet (still starting) is waited for by `await` like a new one.
start() {
  local svc=$1 port=$2; shift 2
  local pid
  if pid=$(live_pid "$svc"); then
    say "$svc already running (pid $pid, port $port)"
    return
  fi
  rm -f "$RUN/$svc.pid" "$RUN/$svc.port"
  launch "$svc" "$port" "$@"
}
await() { wait_healthy "$@"; }

http_ok() { # URL [expected body substring]
  "$PY" - "$@" <<'PY'
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    body = r.read().decode(errors="replace")
sys.exit(0 if r.status == 200 and (len(sys.argv) < 3 or sys.argv[2] in body) else 1)
PY
}

# ---------------------------------------------------------------------------------------------
# ports and the environment every service and client shares

S3_PORT=$(port_for s3 "${CLIPSHIFT_S3_PORT:-19000}")
if live_pid s3 >/dev/null && [ -f "$RUN/s3.backend" ]; then
  S3_BACKEND=$(cat "$RUN/s3.backend") # the running store decides, whatever the env says now
fi
MLFLOW_PORT=$(port_for mlflow "${CLIPSHIFT_MLFLOW_PORT:-15000}")
PREFECT_PORT=$(port_for prefect "${CLIPSHIFT_PREFECT_PORT:-14200}")
S3_URL=http://$HOST:$S3_PORT
MLFLOW_URL=http://$HOST:$MLFLOW_PORT
PREFECT_API=http://$HOST:$PREFECT_PORT/api
if [ "$S3_BACKEND" = s3rver ]; then
  KEY_ID=S3RVER; SECRET=S3RVER # s3rver's built-in pair; it checks request signatures
else
  KEY_ID=clipshift-local; SECRET=clipshift-local-secret # moto accepts any pair
fi

# Credentials are for the loopback store only: never the user's real AWS identity.
export AWS_ENDPOINT_URL_S3=$S3_URL MLFLOW_S3_ENDPOINT_URL=$S3_URL
export AWS_ACCESS_KEY_ID=$KEY_ID AWS_SECRET_ACCESS_KEY=$SECRET AWS_DEFAULT_REGION=us-east-1
# Empty AWS config files (not /dev/null, which aiobotocore, under dvc-s3 and s3fs, rejects) keep
# the user's profiles out of the services.
mkdir -p "$STATE/aws" && touch "$STATE/aws/config" "$STATE/aws/credentials"
export AWS_CONFIG_FILE=$STATE/aws/config AWS_SHARED_CREDENTIALS_FILE=$STATE/aws/credentials
unset AWS_PROFILE AWS_SESSION_TOKEN AWS_ENDPOINT_URL
export DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true
export PREFECT_HOME=$STATE/prefect PATH=$BIN:$PATH

# ---------------------------------------------------------------------------------------------
# s3

s3_ok() {
  "$PY" - "$S3_URL" <<'PY'
import sys, boto3
from botocore.config import Config
cfg = Config(connect_timeout=2, read_timeout=2, retries={"max_attempts": 1})
boto3.client("s3", endpoint_url=sys.argv[1], config=cfg).list_buckets()
PY
}

if [ "$S3_BACKEND" = s3rver ]; then
  S3RVER=$STATE/node/node_modules/.bin/s3rver
  if [ ! -x "$S3RVER" ]; then
    command -v npm >/dev/null || die "S3_BACKEND=s3rver needs npm (Node.js); or use S3_BACKEND=moto"
    say "installing s3rver from npm into $STATE/node (once)"
    npm install --silent --no-audit --no-fund --prefix "$STATE/node" s3rver@3.7.1 >/dev/null \
      || die "npm install s3rver failed; check npm's registry settings, or use S3_BACKEND=moto"
  fi
  mkdir -p "$STATE/s3rver"
  start s3 "$S3_PORT" "$S3RVER" --address "$HOST" --port "$S3_PORT" \
    --directory "$STATE/s3rver" --silent
else
  start s3 "$S3_PORT" "$BIN/moto_server" -H "$HOST" -p "$S3_PORT"
fi
echo "$S3_BACKEND" >"$RUN/s3.backend"

# ---------------------------------------------------------------------------------------------
# mlflow: the server proxies artifacts (clients need no S3 access); one worker, no job runner,
# which keeps it near 0.5 GB instead of 2.4 GB.

start mlflow "$MLFLOW_PORT" env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
  "$BIN/mlflow" server --host "$HOST" --port "$MLFLOW_PORT" --workers 1 \
  --backend-store-uri "sqlite:///$STATE/mlflow.db" \
  --artifacts-destination "s3://$BUCKET/mlartifacts"

# ---------------------------------------------------------------------------------------------
# prefect server and its process worker

# prefect-server.sh sets the UI's API address (PREFECT_UI_API_URL) to this server's own API:
# without it the browser UI calls port 4200 and shows "Can't connect to Server API".
start prefect "$PREFECT_PORT" env CLIPSHIFT_VENV_BIN="$BIN" bash "$HERE/prefect-server.sh" \
  "$PREFECT_PORT"

# The three servers start together (each takes seconds to import and migrate); then wait.
await s3 s3_ok
"$PY" - "$S3_URL" "$BUCKET" "$DATA_BUCKET" <<'PY'
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
have = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
for name in sys.argv[2:]:
    if name not in have:
        s3.create_bucket(Bucket=name)
        print(f"up.sh: created bucket s3://{name}")
PY

await mlflow http_ok "$MLFLOW_URL/health" OK
await prefect http_ok "$PREFECT_API/health" true

export PREFECT_API_URL=$PREFECT_API MLFLOW_TRACKING_URI=$MLFLOW_URL
"$PY" -m clipshift.deploy ensure-pool --pool "$POOL" --type process

WORKER_NAME="clipshift-local-$PREFECT_PORT"
# Healthy = the server has a heartbeat from our worker newer than $1 (epoch seconds): a record
# of an earlier worker of the same name stays ONLINE for a while after it stopped.
worker_ok() {
  "$PY" - "$PREFECT_API" "$POOL" "$WORKER_NAME" "$1" <<'PY'
import json, sys, urllib.request
from datetime import datetime
api, pool, name, since = sys.argv[1:]
req = urllib.request.Request(
    f"{api}/work_pools/{pool}/workers/filter", data=b"{}", method="POST",
    headers={"Content-Type": "application/json"},
)
with urllib.request.urlopen(req, timeout=2) as r:
    workers = json.load(r)
beats = [
    datetime.fromisoformat(w["last_heartbeat_time"]).timestamp()
    for w in workers
    if w["name"] == name and w.get("status") == "ONLINE" and w.get("last_heartbeat_time")
]
sys.exit(0 if beats and max(beats) >= float(since) else 1)
PY
}
limit_args=()
[ -n "${CLIPSHIFT_WORKER_LIMIT:-}" ] && limit_args=(--limit "$CLIPSHIFT_WORKER_LIMIT")
# Flow runs start in CLIPSHIFT_WORKDIR (prefect.yaml's pull step reads it from this env) and
# see this environment (endpoints, local-only credentials). The worker listens on no port.
export CLIPSHIFT_WORKDIR=$WORKDIR
export PREFECT_WORKER_QUERY_SECONDS=${PREFECT_WORKER_QUERY_SECONDS:-2}
since=$(($(date +%s) - 60))
if pid=$(live_pid worker) && worker_ok "$since"; then
  say "worker already running (pid $pid, pool $POOL)"
else
  if ! live_pid worker >/dev/null; then
    rm -f "$RUN/worker.pid"
    echo "=== $(date -Is) starting worker on pool $POOL" >>"$LOGS/worker.log"
    since=$(date +%s)
    setsid "$BIN/prefect" worker start --pool "$POOL" --type process --name "$WORKER_NAME" \
      --install-policy never "${limit_args[@]}" >>"$LOGS/worker.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid $(start_ticks "$pid")" >"$RUN/worker.pid"
    date +%s.%N >"$RUN/worker.started"
  fi
  wait_healthy worker worker_ok "$since"
fi

# ---------------------------------------------------------------------------------------------
# endpoints file: what a client sources to use this platform (local-only credentials)

mkdir -p "$(dirname "$ENDPOINTS")"
tmp=$ENDPOINTS.tmp.$$
cat >"$tmp" <<EOF
# Written by infra/local/up.sh on $(date -Is); source it: . $ENDPOINTS
# Credentials below are dummies for the loopback S3 store only (S3_BACKEND=$S3_BACKEND).
export MLFLOW_TRACKING_URI=$MLFLOW_URL
export PREFECT_API_URL=$PREFECT_API
export AWS_ENDPOINT_URL_S3=$S3_URL
export AWS_ACCESS_KEY_ID=$KEY_ID
export AWS_SECRET_ACCESS_KEY=$SECRET
export AWS_DEFAULT_REGION=us-east-1
export CLIPSHIFT_BUCKET=$BUCKET
export CLIPSHIFT_DATA_BUCKET=$DATA_BUCKET
export CLIPSHIFT_MLFLOW_ARTIFACTS=s3://$BUCKET/mlartifacts
export CLIPSHIFT_DVC_REMOTE=s3://$BUCKET/dvc
export CLIPSHIFT_WORK_POOL=$POOL
EOF
mv "$tmp" "$ENDPOINTS"

say "ready:"
say "  S3 ($S3_BACKEND)  $S3_URL   buckets s3://$BUCKET, s3://$DATA_BUCKET"
say "  MLflow       $MLFLOW_URL"
say "  Prefect UI   http://$HOST:$PREFECT_PORT   (work pool $POOL, flows run in $WORKDIR)"
say "  endpoints    . $ENDPOINTS"
[ "$S3_BACKEND" = moto ] && say "  note: moto keeps objects in memory; they are lost when it stops (S3_BACKEND=s3rver persists)"
exit 0
