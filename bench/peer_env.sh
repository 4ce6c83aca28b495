#!/usr/bin/env bash
# Create the isolated environment the peer tools run in: bench/.peer-venv (gitignored).
#
# The peers need pins the project cannot share: open_clip_train (inside the open_clip_torch
# wheel) needs pandas and webdataset<=0.2.86 (with webdataset 1.0.x its loader fails with
# KeyError: 'fname'), and CLIP_benchmark brings its own dependencies. torch/torchvision are the
# same versions as the project venv (pip takes them from the local disk), so the comparison
# measures the training/evaluation code, not the torch build.
#
# Usage: bash bench/peer_env.sh          (idempotent: re-running checks and exits quickly)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${PEER_VENV:-$here/.peer-venv}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null || python=python3

if [ -x "$venv/bin/python" ] && "$venv/bin/python" - <<'PY' 2>/dev/null; then
import clip_benchmark.cli, open_clip, open_clip_train.main, pandas, webdataset, torch  # noqa: F401
assert webdataset.__version__ <= "0.2.86", webdataset.__version__
import numpy
assert tuple(map(int, numpy.__version__.split(".")[:2])) < (2, 4), numpy.__version__
PY
    echo "peer venv ready: $venv"
    exit 0
fi

"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
"$venv/bin/pip" install --quiet \
    "torch==2.14.1" "torchvision==0.29.1" \
    "open_clip_torch==3.3.0" "webdataset<=0.2.86" pandas \
    clip-benchmark requests "numpy<2.4"
# requests: clip_benchmark imports it without declaring it. numpy<2.4: clip_benchmark 1.6.2's
# accuracy() calls float() on a 1-element array, a TypeError from numpy 2.4 on.
# clip-benchmark may pull a newer webdataset; the training peer needs the old one.
"$venv/bin/pip" install --quiet "webdataset<=0.2.86" "numpy<2.4"
"$venv/bin/python" - <<'PY'
import clip_benchmark.cli, open_clip, open_clip_train.main, torch, webdataset  # noqa: F401
print("peer venv ok: torch", torch.__version__, "open_clip", open_clip.__version__,
      "webdataset", webdataset.__version__)
PY
