#!/usr/bin/env bash
# The long randomized convergence run against the emulators:
#   scripts/convergence.sh [SEEDS (two regions, 300)] [FIRST_SEED (0)] [SEEDS_3 (three regions, 100)]
# (CI runs 6 two-region and 4 three-region seeds as part of the test suite.)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
CONVERGENCE_SEEDS="${1:-300}" CONVERGENCE_SEED_START="${2:-0}" CONVERGENCE_SEEDS_3="${3:-100}" \
  exec .venv/bin/pytest -q tests/test_convergence_random.py "${@:4}"
