#!/usr/bin/env bash
# Build replicatord on a machine with a package index, install it on an EC2 host
# (README "Deploying on an EC2 host").
#
#   scripts/deploy.sh build [--wheelhouse [--target-python X.Y] [--target-arch ARCH]] [--dist DIR] [--python PY]
#       dist/replicatord-<version>-py3-none-any.whl; with --wheelhouse also dist/wheelhouse/:
#       the wheel, every runtime dependency pinned in config/requirements.lock as a wheel checked
#       against the lock's hashes, and the lock, for hosts that reach no package index. The
#       wheelhouse is for CPython X.Y on manylinux ARCH (x86_64 or aarch64): by default --python's.
#   scripts/deploy.sh install [--wheel FILE] [--wheelhouse DIR] [--root DIR]
#                             [--topology FILE] [--region R] [--python PY]
#       /opt/replicatord/.venv (the locked dependencies with --require-hashes, then the wheel
#       without extras or dependencies), the systemd unit, and
#       /etc/replicatord/{topology.yaml,replicatord.env} unless they exist already.
#
# Both are safe to run again: build replaces its wheels, install upgrades the package in place
# and keeps the configuration files. Errors are one line on stderr, exit status 1 (2 for
# a wrong command line).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
prog=scripts/deploy.sh

die() {
  echo "$prog: error: $*" >&2
  exit 1
}
usage_error() {
  echo "$prog: error: $*" >&2
  echo "usage: $prog build [--wheelhouse [--target-python X.Y] [--target-arch x86_64|aarch64]] [--dist DIR] [--python PY]" >&2
  echo "       $prog install [--wheel FILE] [--wheelhouse DIR] [--root DIR] [--topology FILE] [--region R] [--python PY]" >&2
  exit 2
}
say() { echo "$prog: $*"; }

# The option's value, or a usage error if it is missing ("--root" as the last word).
value_of() {
  if [ $# -lt 2 ] || [ -z "$2" ] || [ "${2#--}" != "$2" ]; then
    usage_error "$1 needs a value"
  fi
  printf '%s' "$2"
}

# The daemon needs Python 3.11+; say which interpreter is too old rather than let pip fail.
check_python() {
  local py=$1
  command -v "$py" >/dev/null || die "$py: not found (pass --python PATH to a Python 3.11+)"
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$py is Python $("$py" -c 'import platform; print(platform.python_version())'); replicatord needs 3.11+ (Amazon Linux 2023: dnf install python3.11, then --python python3.11)"
}

# "cp311 linux-x86_64": what compiled wheels (uvloop, pydantic-core, aiohttp, ...) are built for.
python_target() {
  "$1" -c 'import sys, sysconfig; print(f"cp{sys.version_info[0]}{sys.version_info[1]} {sysconfig.get_platform()}")'
}

cmd_build() {
  local wheelhouse=0 py=${PYTHON:-python3} dist=$here/dist target_python="" target_arch=""
  while [ $# -gt 0 ]; do
    case $1 in
      --wheelhouse) wheelhouse=1; shift ;;
      --target-python) target_python=$(value_of "$@"); shift 2 ;;
      --target-arch) target_arch=$(value_of "$@"); shift 2 ;;
      --dist) dist=$(value_of "$@"); shift 2 ;;
      --python) py=$(value_of "$@"); shift 2 ;;
      *) usage_error "build: unknown argument $1" ;;
    esac
  done
  if [ -n "$target_python$target_arch" ] && [ "$wheelhouse" = 0 ]; then
    usage_error "--target-python and --target-arch are for --wheelhouse"
  fi
  if [ -n "$target_python" ] && ! [[ $target_python =~ ^3\.(1[1-9]|[2-9][0-9])$ ]]; then
    usage_error "--target-python: $target_python is not a Python version replicatord runs on (3.11, 3.12, ...)"
  fi
  case $target_arch in
    "" | x86_64 | aarch64) ;;
    *) usage_error "--target-arch: $target_arch is not x86_64 or aarch64" ;;
  esac
  local lock=$here/config/requirements.lock
  [ "$wheelhouse" = 0 ] || [ -f "$lock" ] || die "$lock is missing: scripts/lock.sh writes it"
  check_python "$py"
  "$py" -m pip --version >/dev/null 2>&1 || die "$py has no pip: use a virtualenv's python (--python .venv/bin/python)"

  local version
  version=$("$py" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
    "$here/pyproject.toml")
  mkdir -p "$dist"
  dist=$(cd "$dist" && pwd)
  # Exactly one replicatord wheel in dist/, so that `install` knows which one to take.
  rm -f "$dist"/replicatord-*.whl

  # Build from a clean copy: setuptools reuses build/lib in the source tree, so a module
  # deleted from the source would still ship in the wheel; the copy also leaves the tree as it was.
  # (Global, not local: the EXIT trap runs after this function has returned.)
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' EXIT
  tar -C "$here" -cf - \
    --exclude=./.git --exclude=./.venv --exclude=./dist --exclude=./build --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=.mypy_cache --exclude=.ruff_cache \
    --exclude=./.demo --exclude=./.aws-local . | tar -C "$stage" -xf -
  "$py" -m pip wheel -q --no-deps --wheel-dir "$dist" "$stage" ||
    die "building the wheel failed (pip's output is above)"
  local wheel=$dist/replicatord-$version-py3-none-any.whl
  [ -f "$wheel" ] || die "pip built no $wheel"
  say "built $wheel"

  if [ "$wheelhouse" = 1 ]; then
    local house=$dist/wheelhouse built_for
    rm -rf "$house"
    # The target: CPython X.Y on glibc Linux of one architecture, "cp311 linux-x86_64" as
    # python_target prints it (install compares). By default the build Python's own.
    built_for=$(python_target "$py")
    [ -z "$target_python" ] || built_for="cp${target_python/./} ${built_for#* }"
    if [ -n "$target_arch" ]; then
      built_for="${built_for% *} linux-$target_arch"
    elif ! [[ $built_for =~ \ linux-(x86_64|aarch64)$ ]]; then
      usage_error "this machine's Python is for ${built_for#* }: pass --target-arch x86_64 or aarch64 (the hosts')"
    fi
    local abi=${built_for% *} arch=${built_for##*-} platforms=() v
    # Wheels for manylinux_2_28 and older (glibc 2.28+: Amazon Linux 2023, RHEL 9, Debian 11+,
    # Ubuntu 20.04+); pip does not widen a --platform to the older tags by itself.
    for v in $(seq 28 -1 5); do platforms+=(--platform "manylinux_2_${v}_$arch"); done
    platforms+=(--platform "manylinux2014_$arch")
    [ "$arch" != x86_64 ] || platforms+=(--platform manylinux2010_x86_64 --platform manylinux1_x86_64)
    # Exactly the lock's releases, each file checked against the lock's hashes (a file that differs
    # from the one locked stops the build), binary only so that nothing is compiled on the host.
    # pip resolves each release's dependencies too: a lock that misses one fails here.
    "$py" -m pip download -q --disable-pip-version-check --require-hashes --only-binary=:all: \
      --implementation cp --python-version "${abi#cp}" --abi "$abi" --abi abi3 --abi none "${platforms[@]}" \
      --dest "$house" -r "$lock" ||
      die "collecting the locked dependencies for $built_for failed (pip's output is above)"
    # The host installs from these alone: the lock (the hashes), then the wheel without dependencies.
    cp "$lock" "$house/requirements.lock"
    cp "$wheel" "$house/"
    echo "$built_for" >"$house/BUILT-FOR"
    say "wheelhouse $house: $(find "$house" -name '*.whl' | wc -l) wheels" \
      "($(du -sh "$house" | cut -f1)) for $built_for, from config/requirements.lock;" \
      "install it only on hosts with that Python version and architecture"
  fi
}

cmd_install() {
  local wheel="" house="" root=/ topology="" region="" py=${PYTHON:-python3}
  while [ $# -gt 0 ]; do
    case $1 in
      --wheel) wheel=$(value_of "$@"); shift 2 ;;
      --wheelhouse) house=$(value_of "$@"); shift 2 ;;
      --root) root=$(value_of "$@"); shift 2 ;;
      --topology) topology=$(value_of "$@"); shift 2 ;;
      --region) region=$(value_of "$@"); shift 2 ;;
      --python) py=$(value_of "$@"); shift 2 ;;
      *) usage_error "install: unknown argument $1" ;;
    esac
  done
  # It ends up in the env file through sed; also catches a typo before anything is written.
  if [ -n "$region" ] && ! [[ $region =~ ^[a-z]{2}(-[a-z]+)+-[0-9]+$ ]]; then
    usage_error "--region: $region is not an AWS region name (e.g. cn-north-1)"
  fi
  [ -z "$topology" ] || [ -f "$topology" ] || die "--topology: $topology: no such file"
  [ -z "$house" ] || [ -d "$house" ] || die "--wheelhouse: $house: no such directory"
  if [ "$root" = / ]; then
    [ "$(id -u)" = 0 ] || die "installing into / needs root: run it with sudo (or --root DIR for a staging tree)"
  fi
  mkdir -p "$root"
  root=$(cd "$root" && pwd)
  local r=${root%/} # "" for /, so that "$r/opt" is /opt
  # The service runs as a dynamic user that must read the venv and the config: a umask of
  # 077 (common on hardened hosts) would make them unreadable to it.
  umask 022

  # Which wheel: the one named, else the only replicatord wheel in the wheelhouse or dist/.
  if [ -z "$wheel" ]; then
    local from=${house:-$here/dist} found=()
    shopt -s nullglob
    found=("$from"/replicatord-*.whl)
    shopt -u nullglob
    [ ${#found[@]} -gt 0 ] || die "no replicatord wheel in $from: run '$prog build' first (or pass --wheel)"
    [ ${#found[@]} -eq 1 ] || die "${#found[@]} replicatord wheels in $from: pass --wheel FILE"
    wheel=${found[0]}
  fi
  [ -f "$wheel" ] || die "--wheel: $wheel: no such file"
  # The dependencies are exactly the lock's releases, every file checked against its hashes:
  # the wheelhouse's copy of the lock (what it was built from), else the checkout's.
  local lock=$here/config/requirements.lock
  if [ -n "$house" ]; then
    lock=$house/requirements.lock
    [ -f "$lock" ] || die "wheelhouse $house has no requirements.lock: build it again with this $prog"
  fi
  [ -f "$lock" ] || die "$lock is missing: scripts/lock.sh writes it"

  local venv=$r/opt/replicatord/.venv
  # Reuse the venv on an upgrade; recreate it if its interpreter is gone (the host's Python
  # was upgraded or removed under it).
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c '' 2>/dev/null; then
    check_python "$py"
    say "creating $venv"
    "$py" -m venv --clear "$venv" ||
      die "cannot create $venv with $py (Debian/Ubuntu: apt-get install python3-venv)"
  fi
  if [ -n "$house" ] && [ -f "$house/BUILT-FOR" ]; then
    local built host
    built=$(cat "$house/BUILT-FOR")
    host=$(python_target "$venv/bin/python")
    [ "$built" = "$host" ] ||
      die "wheelhouse $house was built for $built, this host's venv is $host: build it on a machine like this host"
  fi

  local pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
  [ -z "$house" ] || pip+=(--no-index --find-links "$house")
  say "installing the dependencies in $lock (--require-hashes) and $(basename "$wheel") into $venv${house:+ from $house (no index)}"
  "${pip[@]}" --require-hashes -r "$lock" ||
    die "pip could not install the locked dependencies of $lock (pip's output is above; a hash mismatch means a file is not the one locked)"
  # The wheel cannot be in the hash lock (it is built after it), so it goes in without
  # dependencies: those are the lock's, installed above. Without extras: a production host needs
  # neither moto nor faker. --force-reinstall puts the wheel's own files in place even when the
  # version number did not change (a rebuilt 0.1.0).
  "${pip[@]}" --no-deps --force-reinstall "$wheel" || die "pip could not install $wheel (pip's output is above)"
  # What --no-deps did not check: that the lock holds what the wheel requires.
  local broken
  broken=$("$venv/bin/python" -m pip check --disable-pip-version-check 2>&1) ||
    die "the installed dependencies do not satisfy $(basename "$wheel") ($(head -n 1 <<<"$broken")): is $lock older than the wheel's pyproject.toml? (scripts/lock.sh --check)"
  "$venv/bin/replicatord" --help >/dev/null || die "the installed $venv/bin/replicatord does not start"

  # The unit is the package's file: replaced on every install. Local changes belong in a
  # drop-in (systemctl edit replicatord), which survives this.
  install -D -m 0644 "$here/systemd/replicatord.service" "$r/etc/systemd/system/replicatord.service"
  say "installed $r/etc/systemd/system/replicatord.service"

  # /etc/replicatord: topology.yaml 0644 (no secrets: read by the service's dynamic user);
  # replicatord.env 0600, owned by root (read by systemd itself; it may hold the proxy's
  # password, regions.R.proxy_password_env). An operator's files are never replaced.
  local etc=$r/etc/replicatord
  install -d -m 0755 "$etc"
  if [ -e "$etc/topology.yaml" ]; then
    say "kept $etc/topology.yaml${topology:+ (not replaced by $topology: remove it first to replace it)}"
    [ -n "$(find "$etc/topology.yaml" -perm -0004)" ] ||
      say "warning: $etc/topology.yaml is not world-readable; the service's dynamic user cannot read it (chmod 0644)"
  else
    install -m 0644 "${topology:-$here/config/replicatord.example.yaml}" "$etc/topology.yaml"
    say "created $etc/topology.yaml from ${topology:-config/replicatord.example.yaml}"
  fi
  if [ -e "$etc/replicatord.env" ]; then
    local kept
    kept=$(sed -n 's/^REPLICATORD_REGION=//p' "$etc/replicatord.env" | tail -n 1)
    say "kept $etc/replicatord.env (REPLICATORD_REGION=$kept)"
    [ -z "$(find "$etc/replicatord.env" -perm /0077)" ] ||
      say "warning: $etc/replicatord.env can be read by other users; it may hold the proxy password (chmod 0600)"
    [ -z "$region" ] || [ "$region" = "$kept" ] ||
      say "warning: --region $region differs from that file's REPLICATORD_REGION=$kept; edit the file by hand"
    region=${region:-$kept}
  else
    # Without --region the value stays empty: the daemon then stops with a one-line
    # configuration error (exit 3, not restarted) instead of serving the example's region.
    sed "s/^REPLICATORD_REGION=.*/REPLICATORD_REGION=$region/" "$here/systemd/replicatord.env.example" \
      >"$etc/replicatord.env"
    chmod 0600 "$etc/replicatord.env"
    say "created $etc/replicatord.env (REPLICATORD_REGION=$region)"
  fi

  if [ "$root" = / ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl daemon-reload || die "systemctl daemon-reload failed"
    if systemctl is-active --quiet replicatord; then
      say "replicatord is running the old version: 'systemctl restart replicatord' to switch"
    fi
  elif [ "$root" != / ]; then
    say "not reloading systemd: installed under the staging root $root"
  else
    say "not reloading systemd: it is not running here"
  fi

  local R=$venv/bin/replicatord C=$etc/topology.yaml reg=${region:-<region>} set_region=""
  [ -n "$region" ] || set_region=$'\n     Set REPLICATORD_REGION in '"$etc/replicatord.env."
  cat <<EOF

Next steps (README "Deploying on an EC2 host"):
  1. Edit $C for your regions, tables, streams and proxies (the same file on every host).$set_region
  2. Once per region, with an operator role (not the instance role), provision:
       $R provision --config $C --only-region $reg
  3. Store the peer partition's key pair in this region's SSM (the secret at a prompt that
     does not echo it, or --secret-file PATH):
       $R provision --config $C --store-peer-credentials $reg <peer region> --access-key-id <id>
  4. Check the plan, then every call the daemon will make, with this host's credentials:
       $R check-config --config $C --region $reg --live
  5. Start it:
       systemctl enable --now replicatord && journalctl -u replicatord -f
EOF
}

[ $# -gt 0 ] || usage_error "missing command"
command=$1
shift
case $command in
  build) cmd_build "$@" ;;
  install) cmd_install "$@" ;;
  -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' ;;
  *) usage_error "unknown command $command" ;;
esac
