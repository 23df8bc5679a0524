#!/usr/bin/env bash
# The long randomized convergence run against the emulators: scripts/convergence.sh [SEEDS] [FIRST_SEED]
# (CI runs 30 seeds as part of the test suite.)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
CONVERGENCE_SEEDS="${1:-300}" CONVERGENCE_SEED_START="${2:-0}" \
  exec .venv/bin/pytest -q tests/test_convergence_random.py "${@:3}"
