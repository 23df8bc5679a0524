#!/usr/bin/env bash
# The test command: set everything up, then lint, type-check and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH:/usr/sbin"
echo "== ruff"; ruff check .
echo "== mypy"; mypy
# The hash lock: a mismatch with pyproject.toml fails; the audit fails only on a known vulnerability
# with a fix, and is advisory (one line, no failure) where PyPI's vulnerability data is unreachable.
echo "== lock"; scripts/lock.sh --check; scripts/lock.sh --audit
echo "== pytest"; pytest --durations=25 "$@"
