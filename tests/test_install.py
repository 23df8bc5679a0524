"""A production install: the wheel without extras, put in place by scripts/deploy.sh.

One wheel and wheelhouse build (`deploy.sh build --wheelhouse`: the runtime dependencies
downloaded from the package index as config/requirements.lock pins them, checked against its
hashes; pip's cache makes later runs faster) and one install from that wheelhouse into a fresh
virtualenv under a staging root (`deploy.sh install --root`) with the package index unreachable,
shared by the module. Every command runs the installed `replicatord` from a neutral directory
with no PYTHONPATH, so neither the source tree nor the development venv (which has the `local`
extra) can stand in for the install.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

# The build and a cold-cache install take most of a minute; the default per-test timeout is
# for one test, and the module fixture is charged to the first test that uses it.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "scripts" / "deploy.sh"
CN = "cn-north-1"
SG = "ap-southeast-1"
SECRET = "s3cret"
LOCK = REPO / "config" / "requirements.lock"
# Where pip finds an index while an install must not use one: a loopback port nothing listens on.
DEAD_INDEX = "http://127.0.0.1:9/simple"


def _clean_env() -> dict[str, str]:
    """The environment without anything that could import from outside the installed venv."""
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV"}
    return {k: v for k, v in os.environ.items() if k not in drop} | {"PYTHONNOUSERSITE": "1"}


def _offline_env() -> dict[str, str]:
    """pip with no configuration file (no extra index, no find-links) and an index that refuses."""
    env = {k: v for k, v in _clean_env().items() if not k.startswith("PIP_")}
    return env | {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": DEAD_INDEX, "PIP_RETRIES": "0",
                  "PIP_TIMEOUT": "5", "HTTPS_PROXY": DEAD_INDEX, "HTTP_PROXY": DEAD_INDEX}


def run(
    *args: str | Path, cwd: Path, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env or _clean_env(), capture_output=True, text=True, timeout=timeout
    )


def deploy(
    *args: str | Path, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run("bash", DEPLOY, *args, cwd=cwd, timeout=timeout, env=env)


def locked() -> dict[str, tuple[str, set[str]]]:
    """config/requirements.lock: each pinned name, its version and the sha256 of its files."""
    pins: dict[str, tuple[str, set[str]]] = {}
    for block in re.split(r"\n(?=[a-z0-9])", LOCK.read_text()):
        pin = re.match(r"([a-z0-9._-]+)==(\S+)", block)
        if pin:
            pins[_canonical(pin[1])] = (pin[2], set(re.findall(r"--hash=sha256:([0-9a-f]{64})", block)))
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Install:
    root: Path
    dist: Path

    @property
    def wheelhouse(self) -> Path:
        return self.dist / "wheelhouse"

    @property
    def venv(self) -> Path:
        return self.root / "opt" / "replicatord" / ".venv"

    @property
    def topology(self) -> Path:
        return self.root / "etc" / "replicatord" / "topology.yaml"

    @property
    def env_file(self) -> Path:
        return self.root / "etc" / "replicatord" / "replicatord.env"

    @property
    def unit(self) -> Path:
        return self.root / "etc" / "systemd" / "system" / "replicatord.service"

    def replicatord(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return run(self.venv / "bin" / "replicatord", *args, cwd=self.root)

    def python(self, code: str) -> subprocess.CompletedProcess[str]:
        return run(self.venv / "bin" / "python", "-c", code, cwd=self.root)


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Install]:
    base = tmp_path_factory.mktemp("install")
    dist, root = base / "dist", base / "root"
    started = time.monotonic()
    built = deploy("build", "--wheelhouse", "--dist", dist, "--python", sys.executable, cwd=base)
    assert built.returncode == 0, built.stdout + built.stderr
    build_s = time.monotonic() - started
    wheels = list(dist.glob("replicatord-*-py3-none-any.whl"))
    assert len(wheels) == 1, wheels
    started = time.monotonic()
    # The wheel from the wheelhouse (the one replicatord wheel in it), as on a host in China.
    done = deploy(
        "install", "--wheelhouse", dist / "wheelhouse", "--root", root, "--region", CN, "--python", sys.executable,
        cwd=base, env=_offline_env(),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # pip never tried the index: it was told not to have one (--no-index), not merely lucky.
    assert "127.0.0.1:9" not in done.stdout + done.stderr, done.stderr
    print(f"\ndeploy.sh build {build_s:.1f}s, install {time.monotonic() - started:.1f}s")  # shown with -s
    yield Install(root, dist)
    shutil.rmtree(base, ignore_errors=True)


def assert_clean(result: subprocess.CompletedProcess[str], status: int = 0) -> None:
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr


def test_the_wheelhouse_holds_the_locked_files_and_the_lock(install: Install) -> None:
    house = install.wheelhouse
    assert (house / "requirements.lock").read_text() == LOCK.read_text()
    assert (house / "BUILT-FOR").read_text().startswith(f"cp{sys.version_info[0]}{sys.version_info[1]} linux-")
    pins = locked()
    seen = set()
    for wheel in house.glob("*.whl"):
        name, version = wheel.name.split("-")[:2]
        if name == "replicatord":
            continue
        assert _canonical(name) in pins, f"{wheel.name} is not in the lock"
        pinned, hashes = pins[_canonical(name)]
        assert version == pinned, wheel.name
        assert hashlib.sha256(wheel.read_bytes()).hexdigest() in hashes, f"{wheel.name}: not the file locked"
        seen.add(_canonical(name))
    assert seen == set(pins), f"locked but not in the wheelhouse: {set(pins) - seen}"
    assert len(list(house.glob("replicatord-*.whl"))) == 1


def test_the_venv_holds_exactly_the_locked_releases(install: Install) -> None:
    listed = install.python(
        "import importlib.metadata as m\nfor d in m.distributions(): print(f\"{d.metadata['Name']}=={d.version}\")"
    )
    assert_clean(listed)
    installed = {_canonical(n): v for n, v in (line.split("==") for line in listed.stdout.split())}
    # What a venv starts with, and the package itself (not in the lock: built after it).
    for own in ("pip", "setuptools", "wheel", "replicatord"):
        installed.pop(own, None)
    assert installed == {name: version for name, (version, _) in locked().items()}


def test_a_file_that_is_not_the_one_locked_is_refused(install: Install, tmp_path: Path) -> None:
    house = tmp_path / "wheelhouse"
    shutil.copytree(install.wheelhouse, house)
    tampered = next(house.glob("six-*.whl"))
    tampered.write_bytes(tampered.read_bytes() + b"\0")  # still a readable zip, another sha256
    root = tmp_path / "root"
    result = deploy("install", "--wheelhouse", house, "--root", root, "--python", sys.executable,
                    cwd=tmp_path, env=_offline_env())
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "DO NOT MATCH THE HASHES" in result.stderr and tampered.name in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("scripts/deploy.sh: error:")]
    assert len(errors) == 1 and "could not install the locked dependencies" in errors[0], result.stderr
    assert not list(root.glob("opt/replicatord/.venv/lib/python3*/site-packages/replicatord"))
    assert not (root / "etc").exists()


def test_a_wheelhouse_without_its_lock_is_refused(tmp_path: Path) -> None:
    house = tmp_path / "wheelhouse"
    house.mkdir()
    (house / "replicatord-0.1.0-py3-none-any.whl").write_bytes(b"")
    result = deploy("install", "--wheelhouse", house, "--root", tmp_path, cwd=tmp_path, timeout=60)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr == (
        f"scripts/deploy.sh: error: wheelhouse {house} has no requirements.lock: build it again with this "
        "scripts/deploy.sh\n"
    )
    assert not (tmp_path / "opt").exists()


def test_a_wheelhouse_for_another_architecture(tmp_path: Path) -> None:
    """Built on this machine for hosts of the other architecture: their wheels, the same lock."""
    arch = "aarch64" if os.uname().machine == "x86_64" else "x86_64"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    result = deploy("build", "--wheelhouse", "--target-arch", arch, "--target-python", version,
                    "--dist", tmp_path, "--python", sys.executable, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    house = tmp_path / "wheelhouse"
    assert (house / "BUILT-FOR").read_text() == f"cp{version.replace('.', '')} linux-{arch}\n"
    compiled = [w.name for w in house.glob("*.whl") if not w.name.endswith("-any.whl")]
    assert compiled and all(w.endswith(f"_{arch}.whl") for w in compiled), compiled
    assert len(list(house.glob("*.whl"))) == len(locked()) + 1


def test_the_install_is_the_wheel_not_the_source_tree(install: Install) -> None:
    where = install.python("import replicatord; print(replicatord.__file__)")
    assert_clean(where)
    assert where.stdout.strip().startswith(str(install.venv)), where.stdout


def test_help_and_check_config_work_without_extras(install: Install) -> None:
    assert_clean(install.replicatord("--help"))
    plan = install.replicatord("check-config", "--config", install.topology, "--region", CN)
    assert_clean(plan)
    assert plan.stderr == ""
    assert f"region {CN}" in plan.stdout and f"peer {SG}:" in plan.stdout
    for command in ("run", "provision", "status"):
        assert_clean(install.replicatord(command, "--help"))


@pytest.mark.parametrize("module", ["faker", "moto"])
def test_the_local_extra_is_not_installed(install: Install, module: str) -> None:
    result = install.python(f"import {module}")
    assert result.returncode == 1
    assert f"ModuleNotFoundError: No module named '{module}'" in result.stderr


@pytest.mark.parametrize(
    ("args", "missing"),
    [
        (("load", "-t", "x", "-r", "y"), "faker"),
        (("load", "-n", "5", "-b", "-t", "user-cn", "-r", CN, "--endpoint-url", "http://127.0.0.1:1"), "faker"),
        (("demo", "--items", "1"), "faker, moto, flask"),
    ],
    ids=["load", "load-all-flags", "demo"],
)
def test_load_and_demo_name_the_missing_extra_in_one_line(
    install: Install, args: tuple[str, ...], missing: str
) -> None:
    result = install.replicatord(*args)
    assert_clean(result, status=4)
    assert result.stdout == ""
    assert result.stderr == (
        f"error: 'replicatord {args[0]}' needs the 'local' extra ({missing} not installed): "
        "pip install 'replicatord[local]'\n"
    )


def test_load_help_works_and_names_the_extra(install: Install) -> None:
    result = install.replicatord("load", "--help")
    assert_clean(result)
    # The flags README documents, and the extra they need.
    flags = ("--count", "--table", "--region", "--batched", "--processes", "--endpoint-url", "--loader-stats-table")
    for flag in flags:
        assert flag in result.stdout
    assert "pip install 'replicatord[local]'" in " ".join(result.stdout.split())


def test_check_config_never_prints_a_proxy_password(install: Install, tmp_path: Path) -> None:
    doc = yaml.safe_load(install.topology.read_text())
    doc["regions"][SG]["proxy"] = f"http://user:{SECRET}@127.0.0.1:3128"
    topology = tmp_path / "topology.yaml"
    topology.write_text(yaml.safe_dump(doc))
    result = install.replicatord("check-config", "--config", topology, "--region", CN)
    assert_clean(result)
    assert "proxy: http://user:***@127.0.0.1:3128" in result.stdout
    assert SECRET not in result.stdout + result.stderr


def test_installed_files_and_modes(install: Install) -> None:
    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    # The service's dynamic user reads the topology and the venv; systemd reads the env file.
    assert mode(install.topology.parent) == 0o755
    assert mode(install.topology) == 0o644
    assert mode(install.env_file) == 0o600  # it may hold the proxy password
    assert mode(install.unit) == 0o644
    assert mode(install.venv / "bin" / "replicatord") & 0o005 == 0o005
    assert install.unit.read_text() == (REPO / "systemd" / "replicatord.service").read_text()
    assert install.topology.read_text() == (REPO / "config" / "replicatord.example.yaml").read_text()
    assert f"\nREPLICATORD_REGION={CN}\n" in install.env_file.read_text()


def test_installed_unit_passes_systemd_analyze_verify(install: Install, tmp_path: Path) -> None:
    """`systemd-analyze verify` on the installed unit prints nothing.

    verify checks that ExecStart='s binary exists, and the unit names /opt/replicatord, which
    only the staging root holds. `--root=` is no way out: it then looks for every unit the
    service depends on (sysinit.target, ...) under that root too. So the check runs on a copy
    whose /opt/replicatord paths point into the staging root, and nothing else changed.
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    text = install.unit.read_text()
    staged = text.replace("/opt/replicatord/", f"{install.root}/opt/replicatord/")
    exec_start = [line for line in staged.splitlines() if line.startswith("ExecStart=")]
    assert len(exec_start) == 1 and exec_start[0].startswith(f"ExecStart={install.venv}/bin/replicatord "), exec_start
    copy = tmp_path / "replicatord.service"
    copy.write_text(staged)
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert result.stderr == ""
    assert result.returncode == 0, result.stdout


def test_unit_hardening_settings(install: Install) -> None:
    settings: dict[str, str] = {}
    for line in install.unit.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            settings[key] = value  # the last assignment wins, as in systemd
    assert settings["LimitCORE"] == "0"
    assert "3" in settings["RestartPreventExitStatus"].split()
    assert "4" not in settings["RestartPreventExitStatus"].split()
    assert settings["MemoryMax"].endswith(("M", "G"))
    assert settings["Restart"] == "on-failure"


def test_deploy_install_again_upgrades_and_keeps_the_config(install: Install) -> None:
    # An operator's edits, and a package file that differs from the wheel's (as after an
    # upgrade with an unchanged version number).
    topology = install.topology.read_text() + "# edited by the operator\n"
    install.topology.write_text(topology)
    env = install.env_file.read_text() + "REPLICATORD_INSTANCE_ID=host-1\n"
    install.env_file.write_text(env)
    package_file = next(install.venv.glob("lib/python3*/site-packages/replicatord/local/load_args.py"))
    package_file.unlink()

    again = deploy("install", "--wheel", next(install.dist.glob("*.whl")), "--root", install.root,
                   "--region", SG, "--topology", REPO / "config" / "local.yaml", cwd=install.root)
    assert again.returncode == 0, again.stdout + again.stderr
    assert install.topology.read_text() == topology
    assert install.env_file.read_text() == env
    assert f"kept {install.topology}" in again.stdout
    assert f"--region {SG} differs" in again.stdout
    assert package_file.exists()
    assert_clean(install.replicatord("check-config", "--config", install.topology, "--region", CN))


@pytest.mark.parametrize(
    ("args", "status", "needle"),
    [
        (("install", "--root"), 2, "--root needs a value"),
        (("install", "--root", "{tmp}", "--region", "Beijing"), 2, "--region: Beijing is not an AWS region name"),
        (("install", "--root", "{tmp}", "--topology", "{tmp}/nope.yaml"), 1, "nope.yaml: no such file"),
        (("install", "--root", "{tmp}", "--wheel", "{tmp}/nope.whl"), 1, "--wheel: {tmp}/nope.whl: no such file"),
        (("install", "--root", "{tmp}", "--wheelhouse", "{tmp}"), 1, "no replicatord wheel in {tmp}"),
        (("build", "--python", "python2.7-nonexistent"), 1, "python2.7-nonexistent: not found"),
        (("build", "--wheelhouse", "--target-arch", "sparc"), 2, "--target-arch: sparc is not x86_64 or aarch64"),
        (("build", "--target-arch", "aarch64"), 2, "--target-python and --target-arch are for --wheelhouse"),
        (("frobnicate",), 2, "unknown command frobnicate"),
    ],
    ids=["missing-value", "bad-region", "no-topology", "no-wheel", "empty-wheelhouse", "no-python", "bad-arch",
         "arch-without-wheelhouse", "unknown"],
)
def test_deploy_errors_are_one_line(tmp_path: Path, args: tuple[str, ...], status: int, needle: str) -> None:
    args = tuple(a.replace("{tmp}", str(tmp_path)) for a in args)
    result = deploy(*args, cwd=tmp_path, timeout=60)
    assert result.returncode == status, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    assert needle.replace("{tmp}", str(tmp_path)) in errors[0]
    # Nothing was installed.
    assert not (tmp_path / "opt").exists()
