#!/usr/bin/env bash
# Sets up everything on a fresh machine with Python 3.11+ and apt: the virtualenv with the
# project and its test tools, squid (proxy tests) unless NEED_SQUID=0 and promtool (alert rule tests)
# unless NEED_PROMTOOL=0.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# squid: the real proxy of the border path in tests; Debian's prometheus package: promtool for the
# alert rules' checks and unit tests, and the server that scrapes daemons in tests/test_prometheus_e2e.py. The demo needs neither (NEED_SQUID=0, NEED_PROMTOOL=0).
packages=()
if [ "${NEED_SQUID:-1}" = 1 ] && ! command -v squid >/dev/null && [ ! -x /usr/sbin/squid ]; then
  packages+=(squid)
fi
if [ "${NEED_PROMTOOL:-1}" = 1 ] && { ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; }; then
  packages+=(prometheus)
fi
if [ ${#packages[@]} -gt 0 ]; then
  echo "bootstrap: installing ${packages[*]} from apt"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.replicatord-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing replicatord and its dependencies into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
  touch "$stamp"
fi
