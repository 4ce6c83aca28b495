#!/usr/bin/env bash
# The test command (README quick start; .ci/run calls exactly this): set up from
# requirements.lock, lint, check the formatting, type-check src/, then the whole suite
# including the slow tests, stopping at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/setup.sh
.venv/bin/ruff check src tests flows bench infra
.venv/bin/ruff format --check src tests flows bench infra
.venv/bin/mypy
.venv/bin/python -m pytest -m "slow or not slow"
