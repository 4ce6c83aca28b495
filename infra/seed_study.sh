#!/usr/bin/env bash
# Re-run the whole default study on another seed and keep its findings beside the main run's.
#
#   bash infra/seed_study.sh SEED
#
# Clones the committed HEAD into a scratch folder, sets fetch.seed and pretrain.seed to SEED
# (a new world draw: classes, renders, pools; new initial weights and batch order), runs
# `dvc repro` there with this checkout's .venv and art cache, and writes the run's
# metrics/findings.json, tagged with the seed and commit, to metrics/seeds/seed-SEED.json.
# `python -m clipshift.stages.report readme` then shows it beside the main run in the README.
set -euo pipefail
seed=${1:?usage: bash infra/seed_study.sh SEED}
repo=$(git rev-parse --show-toplevel)
commit=$(git -C "$repo" rev-parse HEAD)
work=$(mktemp -d "${TMPDIR:-/tmp}/clipshift-seed-$seed.XXXXXX")
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/study"
cd "$work/study"
ln -s "$repo/.venv" .venv
mkdir -p "$repo/.cache" && ln -s "$repo/.cache" .cache
# shellcheck disable=SC1091
. .venv/bin/activate
python - "$seed" <<'PY'
import sys
import yaml
seed = int(sys.argv[1])
params = yaml.safe_load(open("params.yaml"))
params["fetch"]["seed"] = params["pretrain"]["seed"] = seed
yaml.safe_dump(params, open("params.yaml", "w"), sort_keys=False)
PY
start=$(date +%s)
dvc repro
mkdir -p "$repo/metrics/seeds"
python - "$seed" "$commit" "$(($(date +%s) - start))" "$repo/metrics/seeds/seed-$seed.json" <<'PY'
import json
import sys
seed, commit, seconds, out = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
findings = json.load(open("metrics/findings.json"))
record = {"seed": seed, "commit": commit, "dvc_repro_seconds": seconds, **findings}
open(out, "w").write(json.dumps(record, indent=2) + "\n")
print(f"wrote {out}")
PY
