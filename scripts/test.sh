#!/usr/bin/env bash
# The test command: set everything up, then lint, type-check and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH:/usr/sbin"
echo "== ruff"; ruff check .
echo "== mypy"; mypy
echo "== pytest"; pytest --durations=25 "$@"
