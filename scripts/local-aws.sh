#!/usr/bin/env bash
# Start or stop the local emulators for config/local.yaml: one moto server per region.
#   scripts/local-aws.sh start | stop
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  start) exec .venv/bin/python -m replicatord.local.emulators start --dir .aws-local \
           cn-north-1=5101 ap-southeast-1=5102 ;;
  stop) exec .venv/bin/python -m replicatord.local.emulators stop --dir .aws-local ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
