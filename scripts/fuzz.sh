#!/usr/bin/env bash
# The long fuzzing run: the property-based tests of the record decoder and of the pipelines'
# per-record isolation with many more examples than CI runs, then the worst-case decode timings.
#   scripts/fuzz.sh [EXAMPLES_PER_PROPERTY]      (default 20000; CI runs 200)
set -euo pipefail
cd "$(dirname "$0")/.."
NEED_SQUID=0 NEED_PROMTOOL=0 scripts/bootstrap.sh
export HYPOTHESIS_PROFILE=fuzz FUZZ_EXAMPLES="${1:-20000}"
.venv/bin/pytest -q -p no:cacheprovider --hypothesis-show-statistics \
  tests/unit/test_hostile_records.py tests/unit/test_isolation.py -k "any_ or fields_replaced or adversarial or repetitions or fuzzed"
.venv/bin/python scripts/bench_decode.py
