#!/usr/bin/env bash
# The main job: set everything up, then run the two-region demo on local emulators.
set -euo pipefail
cd "$(dirname "$0")/.."
NEED_SQUID=0 NEED_PROMTOOL=0 scripts/bootstrap.sh
exec .venv/bin/replicatord demo "$@"
