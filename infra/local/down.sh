#!/usr/bin/env bash
# Stop the services infra/local/up.sh started, and only those: each PID file names a process
# (checked against its recorded start time, so a recycled PID is never signalled) whose process
# group and descendants (e.g. flow runs the worker spawned in sessions of their own) get
# SIGTERM, then SIGKILL after CLIPSHIFT_STOP_TIMEOUT seconds (default 20; the Prefect worker
# gets CLIPSHIFT_WORKER_STOP_TIMEOUT, default 5: prefect 3.8's worker does not exit on one
# SIGTERM, only on a second one, which is sent after the timeout). Data in the state
# dir (MLflow and Prefect databases, logs, s3rver objects) is kept; PID files are removed.
# moto's objects live in its memory and are gone once it stops.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE=${CLIPSHIFT_PLATFORM_DIR:-$HERE/state}
RUN=$STATE/run
STOP_TIMEOUT=${CLIPSHIFT_STOP_TIMEOUT:-20}
WORKER_STOP_TIMEOUT=${CLIPSHIFT_WORKER_STOP_TIMEOUT:-5}

say() { echo "down.sh: $*"; }

start_ticks() { awk '{print $22}' "/proc/$1/stat" 2>/dev/null || true; }

# All descendants of PID (children first found, then theirs), from /proc's parent links.
descendants() {
  local parent=$1 child
  for child in $(ps -o pid= --ppid "$parent" 2>/dev/null); do
    echo "$child"
    descendants "$child"
  done
}

# PIDs of the list (of "PID:STARTTIME") that still name the process recorded.
still_ours() {
  local item
  for item in "$@"; do
    [ "$(start_ticks "${item%%:*}")" = "${item##*:}" ] && echo "${item%%:*}"
  done
  return 0
}

stop() {
  local svc=$1 timeout=$2 file=$RUN/$1.pid pid ticks
  [ -f "$file" ] || return 0
  read -r pid ticks <"$file" || true
  if [ -z "${pid:-}" ] || [ "$(start_ticks "$pid")" != "$ticks" ]; then
    say "$svc was not running (stale PID file removed)"
    rm -f "$file" "$RUN/$svc.port" "$RUN/$svc.started" "$RUN/$svc.backend"
    return 0
  fi
  # Collect the whole tree before signalling (once the leader exits, orphans are re-parented),
  # each with its start time so that only these processes are ever signalled.
  local tree=() p
  for p in $pid $(descendants "$pid") $(ps -o pid= -g "$pid" 2>/dev/null); do
    tree+=("$p:$(start_ticks "$p")")
  done
  # shellcheck disable=SC2046 # one PID per word is intended
  kill -TERM $(still_ours "${tree[@]}") 2>/dev/null || true
  local waited=0
  while [ -n "$(still_ours "${tree[@]}")" ] && [ "$waited" -lt $((timeout * 10)) ]; do
    sleep 0.1
    waited=$((waited + 1))
  done
  if [ -n "$(still_ours "${tree[@]}")" ]; then
    # A second SIGTERM is how a Prefect worker is told to stop now (it then kills itself).
    # shellcheck disable=SC2046
    kill -TERM $(still_ours "${tree[@]}") 2>/dev/null || true
    sleep 2
  fi
  if [ -n "$(still_ours "${tree[@]}")" ]; then
    say "$svc did not stop in ${timeout}s; sending SIGKILL"
    # shellcheck disable=SC2046
    kill -KILL $(still_ours "${tree[@]}") 2>/dev/null || true
  fi
  rm -f "$file" "$RUN/$svc.port" "$RUN/$svc.started" "$RUN/$svc.backend"
  say "stopped $svc (pid $pid)"
}

[ -d "$RUN" ] || { say "nothing to stop (no $RUN)"; exit 0; }
# The worker first (it may be running flows that talk to the others), the store last.
stop worker "$WORKER_STOP_TIMEOUT"
for svc in prefect mlflow s3; do stop "$svc" "$STOP_TIMEOUT"; done
