#!/usr/bin/env bash
# Set up clipshift on a fresh clone: a Python 3.11 venv in .venv with every dependency at the
# version and sha256 that requirements.lock pins (uv or pip, --require-hashes), the project installed
# editable on top (--no-deps), and the emoji art from npm. Safe to run again: it skips what is
# already in place (keyed on the hash of pyproject.toml, requirements.lock and
# infra/art/package.json). The README's "Installing" section says how to refresh the lock.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PYTHON=$candidate; break
    fi
  done
fi
[ -n "$PYTHON" ] || { echo "setup: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

# cairosvg needs the cairo C library to rasterise the SVG emoji art.
if ! ldconfig -p 2>/dev/null | grep -q 'libcairo.so.2'; then
  echo "setup: installing libcairo2 (needed by cairosvg)"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq libcairo2 >/dev/null
  else sudo apt-get update -qq && sudo apt-get install -y -qq libcairo2 >/dev/null; fi
fi

[ -f requirements.lock ] || { echo "setup: requirements.lock is missing (see README, Installing)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# pip, quietly, without the notes about this machine's local package folders; fails with pip.
pip_q() {
  .venv/bin/pip -q --disable-pip-version-check "$@" 2>&1 | { grep -v '^WARNING: Location' || true; }
}
stamp=.venv/.clipshift-installed
want=$(cat pyproject.toml requirements.lock infra/uv.lock.txt infra/art/package.json 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python dependencies into .venv from requirements.lock (first time: a few minutes)"
  # Every package, transitive ones included, at its locked version; a file whose sha256 is not
  # in the lock, or a dependency the lock lacks, is refused.
  # uv (itself pinned by hash in infra/uv.lock.txt) installs the lock ~8x faster than pip
  # (measured: 33 s warm, 36 s with an empty cache, against ~5 min for pip); pip is the
  # fallback where uv cannot run. Both refuse a file whose sha256 the lock does not name.
  if pip_q install --require-hashes -r infra/uv.lock.txt && [ -x .venv/bin/uv ]; then
    # --compile-bytecode: pip writes .pyc files at install time, uv only when asked; where
    # PYTHONDONTWRITEBYTECODE is set (as on these machines) nothing writes them later, and
    # every stage would compile torch, prefect and mlflow again (measured: their import took
    # 38 s without .pyc, 18 s with, on the 2-core machine while a stage ran beside it)
    .venv/bin/uv pip install -q --compile-bytecode --python .venv/bin/python \
      --require-hashes -r requirements.lock \
      || { echo "setup: installing requirements.lock failed; see the uv output above" >&2; exit 1; }
  else
    echo "setup: uv unavailable, installing with pip (slower)"
    pip_q install --require-hashes -r requirements.lock \
      || { echo "setup: installing requirements.lock failed; see the pip output above" >&2; exit 1; }
  fi
  # The project itself, editable, with nothing more: its build backend (setuptools) is locked too.
  pip_q install --no-deps --no-build-isolation -e . \
    || { echo "setup: installing the project failed; see the pip output above" >&2; exit 1; }
  .venv/bin/python -c "import clipshift, open_clip, prefect, mlflow" \
    || { echo "setup: the Python install failed; see the pip output above" >&2; exit 1; }
  echo "$want" > "$stamp"
fi

# Emoji art that ships on npm (Fluent and Noto colour); the world builder also installs it
# on demand, this just does it up front.
if [ -f infra/art/package.json ] && command -v npm >/dev/null 2>&1; then
  .venv/bin/python -c "from clipshift.data.world.art import ensure_npm_art, pinned_npm_versions
ensure_npm_art('.cache/clipshift', pinned_npm_versions())"
fi
echo "setup: ready (.venv)"
