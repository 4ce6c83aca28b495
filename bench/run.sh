#!/usr/bin/env bash
# Run every comparison, one after the other (never two at once: they would slow each other),
# each writing bench/results/<name>.json. Usage, from anywhere:
#
#   bash bench/run.sh                 # all, default repeats
#   REPEATS=5 bash bench/run.sh       # more A/B repeats for each
#   bash bench/run.sh train eval      # only these (train eval wiseft orchestration loader)
#
# The peer venv (bench/.peer-venv) is created on first use. Logs: bench/work/<name>.log.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
cd "$repo"
py="$repo/.venv/bin/python"
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(train eval wiseft loader orchestration)
repeat_args=()
[ -n "${REPEATS:-}" ] && repeat_args=(--repeats "$REPEATS")

bash "$here/peer_env.sh" || { echo "peer venv setup failed" >&2; exit 1; }
mkdir -p "$here/work" "$here/results"
failed=()
for name in "${names[@]}"; do
    extra=()
    [ "$name" = orchestration ] && extra=(--prefect-server)
    echo "== $name ($(date +%H:%M:%S), load $(cut -d' ' -f1-3 /proc/loadavg))"
    if ! "$py" "$here/bench_$name.py" "${repeat_args[@]}" "${extra[@]}" 2> >(tee "$here/work/$name.log" >&2); then
        failed+=("$name")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]} (see bench/work/<name>.log)" >&2
    exit 1
fi
echo "results: $here/results/"
