#!/usr/bin/env bash
# The hash lock of replicatord's runtime dependencies, config/requirements.lock (README
# "Deploying on an EC2 host"): what scripts/deploy.sh puts in a wheelhouse and installs with
# pip's --require-hashes.
#
#   scripts/lock.sh            regenerate config/requirements.lock from pyproject.toml
#   scripts/lock.sh --upgrade  move the cut-off date below to today, then regenerate
#   scripts/lock.sh --check    exit 1 with one line if the lock is not what pyproject.toml gives
#   scripts/lock.sh --audit    pip-audit of the lock (policy below)
#
# uv resolves [project] dependencies only (no extras), universally: one lock for every host with
# Python 3.11+, x86_64 and aarch64 alike (it holds the hashes of every file of each pinned release;
# pip takes the one that fits the host). uv and pip-audit come with the dev extra.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
prog=scripts/lock.sh
lock=config/requirements.lock

# Only releases (and files) uploaded before this instant are candidates, so the same pyproject.toml
# always resolves to the same lock: --check does not turn red when PyPI publishes a new boto3 (that
# happens most days). Moved forward on purpose, with --upgrade, when the pins should move (a fix,
# a new dependency floor).
EXCLUDE_NEWER=2026-12-01T00:00:00Z

# pip-audit policy: FAIL on a known vulnerability that has a fixed release (the fix is a lock bump:
# `scripts/lock.sh --upgrade`, or a floor in pyproject.toml when the fix lies outside its range);
# REPORT, one line each, a vulnerability with no fix yet (nothing to bump to; blocking every CI run
# on it would only teach people to ignore the check). A vulnerability judged not to apply goes in
# AUDIT_IGNORE with its reason. The data is PyPI's JSON API (the advisories PyPI gets from OSV);
# osv.dev itself is not reachable from CI. When that data cannot be had (no network, or a package
# mirror that serves the index but not PyPI's per-release JSON, so every release is "not found")
# the audit says so in one line and passes: it is advisory offline. The lock check is not.
AUDIT_IGNORE=(
  # "PYSEC-0000-00000"  # why it does not apply to replicatord
)

die() {
  echo "$prog: error: $*" >&2
  exit 1
}

cd "$here"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python=$here/.venv/bin/python
[ -x "$python" ] || python=python3

find_tool() {
  if [ -x "$here/.venv/bin/$1" ]; then
    echo "$here/.venv/bin/$1"
  elif command -v "$1" >/dev/null; then
    command -v "$1"
  else
    die "$1 not found: scripts/bootstrap.sh installs it into .venv (dev extra)"
  fi
}

# uv pip compile into $1. Its stderr goes to $2. No uv.toml is read (--no-config), so a developer's
# settings (resolution = "lowest", another index) cannot change the lock; UV_DEFAULT_INDEX still can,
# for a mirror of PyPI (same files, same hashes).
compile() {
  local uv
  uv=$(find_tool uv) || exit 1
  "$uv" --no-config pip compile pyproject.toml --quiet \
    --universal --python-version 3.11 --generate-hashes \
    --exclude-newer "$EXCLUDE_NEWER" --custom-compile-command "$prog" \
    --output-file "$1" 2>"$2"
}

# The requirements of a lock without its comments: what pip reads.
pins() {
  sed -e 's/[[:space:]]*#.*$//' -e '/^[[:space:]]*$/d' "$1"
}

# Offline, the lock can still be checked against pyproject.toml's own lines: every dependency
# pinned (==, with hashes) inside its specifier. Transitive pins need the index's metadata.
check_offline() {
  "$python" - "$lock" <<'EOF'
import re
import sys
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

text = open(sys.argv[1]).read()
pins = {canonicalize_name(m[1]): m[2] for m in re.finditer(r"^([A-Za-z0-9._-]+)==(\S+)", text, re.M)}
blocks = re.split(r"\n(?=[A-Za-z0-9])", text)
unhashed = [b.split("==")[0] for b in blocks if "==" in b and "--hash=sha256:" not in b]
wrong = []
for line in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    req = Requirement(line)
    version = pins.get(canonicalize_name(req.name))
    if version is None:
        wrong.append(f"{req.name} not pinned")
    elif not req.specifier.contains(version, prereleases=True):
        wrong.append(f"{req.name}=={version} outside {req.specifier}")
wrong += [f"{name} without hashes" for name in unhashed]
if wrong:
    print("; ".join(wrong))
    sys.exit(1)
EOF
}

cmd_generate() {
  local out=$tmp/requirements.lock err=$tmp/uv.err
  # A fresh resolution, not one that prefers the old lock's pins (uv does that with -o on an existing file).
  compile "$out" "$err" || die "uv pip compile failed: $(grep -m1 -i 'error' "$err" || tail -n 1 "$err")"
  mv "$out" "$lock"
  echo "$prog: wrote $lock ($(grep -c '^[a-z0-9]' "$lock") pins, releases before $EXCLUDE_NEWER)"
}

cmd_check() {
  [ -f "$lock" ] || die "$lock is missing: run $prog"
  local out=$tmp/requirements.lock err=$tmp/uv.err
  if ! compile "$out" "$err"; then
    if grep -q -i -E 'no solution found|because .* depends on' "$err"; then
      die "pyproject.toml's dependencies do not resolve with releases before $EXCLUDE_NEWER: $(grep -m1 -o 'Because.*' "$err")"
    fi
    grep -q -i -E 'request failed|failed to fetch|dns error|connect|timed out|network' "$err" ||
      die "uv pip compile failed: $(grep -m1 -i 'error' "$err" || tail -n 1 "$err")"
    # No index (a laptop on a train): check what can be checked without one, and say so.
    local why
    why=$(check_offline) ||
      die "$lock does not match pyproject.toml ($why): run $prog"
    echo "$prog: the index is unreachable ($(grep -m1 -i -E 'error|fail' "$err" | sed 's/^[[:space:]]*//' | cut -c1-120)); checked offline only: $lock pins every dependency of pyproject.toml within its range"
    return 0
  fi
  if ! diff -q <(pins "$lock") <(pins "$out") >/dev/null; then
    local changes
    changes=$(diff <(grep -E '^[a-z0-9]' "$lock" | sed 's/ .*//') <(grep -E '^[a-z0-9]' "$out" | sed 's/ .*//') |
      sed -n 's/^\([<>]\) /\1/p' | sed 's/^</-/; s/^>/+/' | tr '\n' ' ' || true)
    changes=${changes% }
    die "$lock does not match pyproject.toml (${changes:-the hashes differ}): run $prog and commit it"
  fi
  echo "$prog: $lock matches pyproject.toml ($(grep -c '^[a-z0-9]' "$lock") pins, releases before $EXCLUDE_NEWER)"
}

cmd_upgrade() {
  local today
  today=$(date -u +%Y-%m-%dT00:00:00Z)
  sed -i "s/^EXCLUDE_NEWER=.*/EXCLUDE_NEWER=$today/" "$here/scripts/lock.sh"
  EXCLUDE_NEWER=$today
  cmd_generate
  echo "$prog: commit scripts/lock.sh (EXCLUDE_NEWER=$today) with the lock"
}

cmd_audit() {
  [ -f "$lock" ] || die "$lock is missing: run $prog"
  local json=$tmp/audit.json err=$tmp/audit.err status=0 id audit
  audit=$(find_tool pip-audit) || exit 1
  local ignore=()
  for id in "${AUDIT_IGNORE[@]}"; do ignore+=(--ignore-vuln "$id"); done
  # --disable-pip: the lock is pinned and hashed, so pip-audit needs no venv and resolves nothing.
  "$audit" -r "$lock" --require-hashes --disable-pip --vulnerability-service pypi \
    --progress-spinner off --timeout 20 --format json --output "$json" "${ignore[@]}" 2>"$err" || status=$?
  if [ ! -s "$json" ]; then
    if grep -q -E 'ConnectionError|ProxyError|ConnectTimeout|ReadTimeout|SSLError|Max retries|Failed to resolve' "$err"; then
      echo "$prog: audit skipped: PyPI's vulnerability data is unreachable ($(grep -m1 -o -E "host='[^']*'" "$err" || echo 'no connection')); advisory offline, not a failure"
      return 0
    fi
    die "pip-audit failed (status $status): $(tail -n 1 "$err")"
  fi
  "$python" - "$json" "$lock" <<'EOF'
import json
import sys

report = json.load(open(sys.argv[1]))
deps = report["dependencies"]
skipped = [d["name"] for d in deps if "skip_reason" in d]
if deps and len(skipped) == len(deps):
    # Every release "not found": the per-release JSON API that holds the advisories is not served
    # here (a mirror that serves only /simple and /pypi/NAME/json); nothing was audited.
    print(f"scripts/lock.sh: audit skipped: PyPI's vulnerability data is unreachable (none of the {len(deps)} "
          "locked releases found through pypi.org/pypi/NAME/VERSION/json); advisory offline, not a failure")
    sys.exit(0)
if skipped:
    print(f"scripts/lock.sh: audit: not audited (not found on PyPI): {', '.join(skipped)}")
fixable = unfixed = 0
for dep in deps:
    for vuln in dep.get("vulns", []):
        fixes = ", ".join(vuln["fix_versions"])
        kind = "fixed in " + fixes if fixes else "no fix yet (reported, not failed)"
        print(f"scripts/lock.sh: audit: {dep['name']}=={dep['version']} {vuln['id']}: {kind}")
        fixable += bool(fixes)
        unfixed += not fixes
if fixable:
    print(f"scripts/lock.sh: error: {fixable} known vulnerabilities with a fix in {sys.argv[2]}: "
          "scripts/lock.sh --upgrade (or AUDIT_IGNORE with a reason)", file=sys.stderr)
    sys.exit(1)
print(f"scripts/lock.sh: audit: {len(deps) - len(skipped)} locked releases, no known vulnerability with a fix"
      + (f" ({unfixed} without a fix, above)" if unfixed else ""))
EOF
}

case ${1:-} in
  "") cmd_generate ;;
  --upgrade) cmd_upgrade ;;
  --check) cmd_check ;;
  --audit) cmd_audit ;;
  -h | --help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' ;;
  *)
    echo "$prog: error: unknown argument $1" >&2
    echo "usage: $prog [--upgrade | --check | --audit]" >&2
    exit 2
    ;;
esac
