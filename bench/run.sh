#!/usr/bin/env bash
# Run every comparison, one after the other (never two at once: they would slow each other),
# each writing bench/results/<name>.json. Usage, from anywhere:
#
#   bash bench/run.sh                 # all, default repeats
#   REPEATS=5 bash bench/run.sh       # more A/B repeats for each
#   bash bench/run.sh train eval      # only these (train eval wiseft orchestration loader)
#   SMOKE=1 bash bench/run.sh         # smoke mode: does each still run? (--smoke, ~3 min)
#
# The peer venv (bench/.peer-venv) is created on first use (not for SMOKE=1). Logs:
# bench/work/<name>.log. A smoke run writes nothing under bench/: its tiny world, work files,
# logs and results go to one temporary directory, printed at the end.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cd "$repo"
py="$repo/.venv/bin/python"
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(train eval wiseft loader orchestration)
repeat_args=()
[ -n "${REPEATS:-}" ] && repeat_args=(--repeats "$REPEATS")

if [ -n "${SMOKE:-}" ]; then
    smoke_dir="$(mktemp -d "${TMPDIR:-/tmp}/clipshift-bench-smoke-XXXXXX")"
    logs="$smoke_dir"
else
    bash "$here/peer_env.sh" || { echo "peer venv setup failed" >&2; exit 1; }
    logs="$here/work"
    mkdir -p "$here/results"
fi
mkdir -p "$logs"
failed=()
for name in "${names[@]}"; do
    extra=()
    if [ -n "${SMOKE:-}" ]; then
        # one tiny world for all (built by the first); work files and results per benchmark
        extra=(--smoke --data-dir "$smoke_dir/data" --work-dir "$smoke_dir/$name")
    elif [ "$name" = orchestration ]; then
        extra=(--prefect-server)
    fi
    echo "== $name ($(date +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg))"
    if ! "$py" "$here/bench_$name.py" "${repeat_args[@]}" "${extra[@]}" 2> >(tee "$logs/$name.log" >&2); then
        failed+=("$name")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]} (see $logs/<name>.log)" >&2
    exit 1
fi
if [ -n "${SMOKE:-}" ]; then
    echo "smoke results: $smoke_dir/<name>/results/"
else
    echo "results: $here/results/"
fi
